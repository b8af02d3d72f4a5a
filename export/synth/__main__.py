"""``python -m export.synth --out DIR [...]``: render a synthetic cone dataset."""

from __future__ import annotations

from export.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
