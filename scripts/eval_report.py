"""Markdown tables of the evaluation (for the README) from the JSON files of ``cd-sfm eval hpatches | pairs | sfm``.

    python scripts/eval_report.py /work/runs/eval/hpatches.json /work/runs/eval/pairs.json /work/runs/eval/sfm.json \
        [--output table.md]

Same as ``cd-sfm eval report JSON ...``. To produce the JSON files (about 15-30 min on 2 CPU cores)::

    cd-sfm eval hpatches --output /work/runs/eval/hpatches.json
    cd-sfm eval pairs --output /work/runs/eval/pairs.json
    cd-sfm eval sfm --output /work/runs/eval/sfm.json --work-dir /work/runs/eval/sfm-work
"""

import sys

from cd_sfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "report", *sys.argv[1:]]))
