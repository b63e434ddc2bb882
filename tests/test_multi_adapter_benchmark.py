"""benchmarks/multi_adapter.py runs end to end at its quick size; its three mixed-batch variants agree."""

import torch


def test_quick_multi_adapter_benchmark():
    from benchmarks.multi_adapter import main, render

    threads = torch.get_num_threads()
    try:
        results = main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    assert set(results["overhead_ms"]) == {"peftc, 1 adapter", "peftc, 8 adapters", "HF PEFT, 1 adapter",
                                           "HF PEFT, 8 adapters"}
    assert len(results["mixed_ms"]) == 3 and all(t > 0 for t in results["mixed_ms"].values())
    # timing is too noisy to assert at this size; the outputs are exact
    assert all(d < 1e-4 for d in results["max_abs_diff"].values()), results["max_abs_diff"]
    assert "| peftc mixed batch (1 call) |" in render(results)
