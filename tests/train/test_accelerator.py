"""Which process is the main one and whether the launch is DeepSpeed: the launcher's word until
accelerate's state exists, accelerate's after."""

import os
import subprocess
import sys
import textwrap

import pytest


def run_python(script: str, **env: str) -> str:
    """Run ``script`` in a fresh process (no accelerate state yet) with only these launch variables set."""
    launch = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "WORLD_SIZE", "LOCAL_RANK",
              "ACCELERATE_USE_DEEPSPEED")
    base = {k: v for k, v in os.environ.items() if k not in launch}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=180,
                            env={**base, "PYTHONPATH": os.pathsep.join(sys.path), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


ASK = """
    import sys
    from moetune.train.accelerator import is_deepspeed_launch, is_main_process
    print(is_main_process(), is_deepspeed_launch(), "torch" in sys.modules)
"""


@pytest.mark.parametrize("env, answer", [
    ({}, "True False False"),
    ({"RANK": "0"}, "True False False"),
    ({"RANK": "1"}, "False False False"),
    ({"PMI_RANK": "2"}, "False False False"),  # mpirun
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "True True False"),
    ({"ACCELERATE_USE_DEEPSPEED": "false", "RANK": "3"}, "False False False"),
])
def test_before_an_accelerator_exists_the_launch_variables_answer_without_importing_torch(env, answer):
    assert run_python(ASK, **env) == answer


def test_once_an_accelerator_exists_its_state_answers():
    # RANK=1 without a process group around it: accelerate's state knows this is the only process.
    answer = run_python("""
        from accelerate import Accelerator
        from moetune.train.accelerator import is_deepspeed_launch, is_main_process
        before = is_main_process()
        Accelerator(cpu=True)
        print(before, is_main_process(), is_deepspeed_launch())
        """, RANK="1")
    assert answer == "False True False"
