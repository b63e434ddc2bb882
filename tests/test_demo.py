"""The demo compiles, shows what the compiler did, and trains: the loss falls."""

import io

from rich.console import Console

from peftc.cli import main
from peftc.demo import run_demo


def test_demo_reports_diffs_and_loss_falls():
    out = io.StringIO()
    losses = run_demo(steps=12, console=Console(file=out, width=200))
    text = out.getvalue()
    assert "insert-lora" in text and "model.layers.0.self_attn.q_proj.lora_A.weight" in text
    assert "layers.1" not in text.split("insert-lora, layer 0")[1].split("training")[0]
    assert losses[-1] < losses[0] - 0.2
    assert "trainable params" in text


def test_cli_demo_exit_code(capsys):
    assert main(["demo", "--steps", "2"]) == 0
    assert "peftc passes" in capsys.readouterr().out
