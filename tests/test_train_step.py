"""benchmarks/train_step.py at tiny sizes on the CPU: flow-grpo against PEC in one run."""

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_step.py"


def test_tiny_prints_phases_throughput_and_the_ratio_to_flow_grpo(capsys):
    main = runpy.run_path(str(SCRIPT))["main"]  # the script's namespace, without running it
    assert main(["--tiny", "--methods", "flow-grpo,pec", "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    assert "== sd3.5-medium (tiny)" in out
    for word in ("rollout", "perceptual", "update", "images/s", "peak GiB", "MFU", "TFLOP"):
        assert word in out, word
    assert out.count("\n   flow-grpo ") == 1 and "pec vs flow-grpo: iteration time x" in out
