"""The runtime is pure inference: it imports and captions with torch and transformers unimportable."""
import subprocess
import sys
import textwrap

from conftest import ROOT

BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                raise ImportError(f"blocked import of {name}: the runtime must not need it")
    sys.meta_path.insert(0, Block())
""")


def test_runtime_captions_without_torch(tiny_engine, tmp_path):
    _, engine = tiny_engine
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    code = BLOCKER + textwrap.dedent(f"""
        import runtime
        pipe = runtime.Blip2Pipeline.from_dir({str(engine)!r})
        out = pipe.caption([{str(tmp_path / 'red.png')!r}], max_new_tokens=5, num_beams=2)
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
