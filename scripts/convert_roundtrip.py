#!/usr/bin/env python3
"""Loads a folder that onehead-convert wrote with `transformers` and checks it against the
fixture's reference (the source fixture pooled by scripts/make_fixtures.py): every next-token
logprob of the reference sequence within 1e-4. Exit status 0 when it matches.

    .venv/bin/python scripts/convert_roundtrip.py CONVERTED_DIR tests/fixtures/converted/NAME.json

engine/tests/parity.rs runs it on each converted fixture.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import load_fixture  # noqa: E402


@torch.no_grad()
def main():
    folder, reference = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    model = load_fixture(folder).eval()
    seq = reference["prompt_ids"] + reference["new_ids"]
    full = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    got = [float(full[i, seq[i + 1]]) for i in range(len(seq) - 1)]
    assert len(got) == len(reference["sequence_logprobs"]) > 0
    worst = max(abs(a - b) for a, b in zip(got, reference["sequence_logprobs"]))
    print(f"{folder}: transformers loads it as {type(model).__name__}; largest logprob difference {worst:.2e}")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
