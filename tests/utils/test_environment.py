import json

import torch

from mmfed.utils.environment import describe_environment, native_bfloat16


def test_environment_names_threads_kernels_and_versions() -> None:
    env = describe_environment()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_native_bfloat16"] is native_bfloat16(torch.device("cpu"))
    assert native_bfloat16(torch.device("meta")) is False  # no such device: float32 under auto
    assert env["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    json.dumps(env, allow_nan=False)  # strict JSON


def test_a_run_summary_records_its_environment_and_threads_sets_torchs(tmp_path) -> None:
    from mmfed.cli import main

    run, before = tmp_path / "run", torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        args = ["train", "experiment=smoke", "rounds=1", "quiet=true", f"threads={want}", f"run_dir={run}"]
        assert main(args) == 0
    finally:
        torch.set_num_threads(before)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["environment"]["torch_threads"] == want
    assert summary["environment"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
