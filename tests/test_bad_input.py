"""Bad input: each case fails with a clear, coded error and nothing is written to --out."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core import RepairConfig
from hcnr_core.errors import IncompatibleCheckpointsError
from hcnr_core.pipeline import RepairPipeline
from tests.toy_cli import repair_argv


def run_cli(toy, out: Path, **paths: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, repair_argv(toy, out, **paths))
    return result.exit_code, result.output


def assert_refused(toy, tmp_path: Path, code: str, message: str, **paths: Path) -> None:
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    exit_code, output = run_cli(toy, out, **paths)
    assert exit_code == 2, output
    assert f"[{code}]" in output and message in output, output
    assert set(tmp_path.iterdir()) == before  # no --out, no staging directory


# --- data --------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "who is bob ?", "response": "i do not know ."})
DATA_CASES = {
    "not json": ([GOOD, GOOD, "{not json"], "line 3: not valid JSON"),
    "not utf-8": ([GOOD, b'{"prompt": "\xff", "response": "x"}'], "line 2: not valid UTF-8"),
    "empty response": ([json.dumps({"prompt": "q", "response": "  "})], "line 1: empty response"),
    "wrong keys": ([GOOD, json.dumps({"question": "q", "answer": "a"})], "line 2: expected a"),
    "unknown key": ([json.dumps({"prompt": "q", "response": "a", "label": 1})], "unknown key"),
    "last not assistant": (
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "q"},
                    ]
                }
            )
        ],
        "line 1: the last message must have role 'assistant'",
    ),
    "bad role": (
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "robot", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            )
        ],
        "messages[0].role",
    ),
    "answerable not bool": (
        [json.dumps({"prompt": "q", "response": "a", "answerable": "yes"})],
        "'answerable' must be true or false",
    ),
    "no samples": ([""], "0 samples; at least 1 required"),
    "array line": (["[1, 2]"], "line 1: each line must be a JSON object"),
}


@pytest.mark.parametrize("which", ["honesty", "task"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_jsonl_is_refused_with_line_numbers(toy, tmp_path, case, which):
    lines, message = DATA_CASES[case]
    data = tmp_path / "data" / "bad.jsonl"
    data.parent.mkdir()
    data.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    assert_refused(toy, tmp_path, "invalid_data", message, **{which: data})


def test_overlong_response_is_refused(toy, tmp_path):
    data = tmp_path / "data" / "long.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"prompt": "q", "response": "yes " * 600}) + "\n")
    assert_refused(toy, tmp_path, "invalid_data", "line 1: response is 601 tokens", task=data)


# --- checkpoints -------------------------------------------------------------------


def copy_base(toy, tmp_path: Path) -> Path:
    target = tmp_path / "models" / "bad"
    shutil.copytree(toy["base"], target)
    return target


class Payload:
    """Unpickling this creates a sentinel file: proof that pickle was (not) loaded."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def pickle_only(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with (ckpt / "pytorch_model.bin").open("wb") as handle:
        pickle.dump(Payload(ckpt.parent / "PWNED"), handle)


def remote_code(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "modeling_evil.py").write_text("open('PWNED', 'w')\n")


def remote_code_tokenizer(ckpt: Path) -> None:
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tok_evil.Tok", None]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))


def index_escapes(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt.parent / "outside.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def symlink_escapes(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt.parent / "outside.safetensors")
    os.symlink(ckpt.parent / "outside.safetensors", ckpt / "model.safetensors")


def corrupt_weights(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")


def no_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "pickle only": (pickle_only, "unsafe_checkpoint", "only pickle weights"),
    "remote code": (remote_code, "unsafe_checkpoint", "'auto_map' asks for custom Python code"),
    "remote tokenizer": (remote_code_tokenizer, "unsafe_checkpoint", "auto_map"),
    "index escapes": (index_escapes, "unsafe_checkpoint", "is not a plain file name"),
    "symlink escapes": (symlink_escapes, "unsafe_checkpoint", "resolves outside the checkpoint"),
    "corrupt weights": (corrupt_weights, "invalid_checkpoint", "not a valid safetensors file"),
    "no config": (no_config, "invalid_checkpoint", "no config.json"),
}


@pytest.mark.parametrize("role", ["base", "finetuned"])
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_unsafe_or_broken_checkpoint_is_refused(toy, tmp_path, case, role):
    mutate, code, message = CHECKPOINT_CASES[case]
    ckpt = copy_base(toy, tmp_path)
    mutate(ckpt)
    assert_refused(toy, tmp_path, code, message, **{role: ckpt})
    assert not (tmp_path / "models" / "PWNED").exists()
    assert not Path("PWNED").exists()


def test_adapter_with_pickle_weights_is_refused(toy, tmp_path):
    adapter = tmp_path / "models" / "adapter"
    shutil.copytree(toy["adapter"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with (adapter / "adapter_model.bin").open("wb") as handle:
        pickle.dump(Payload(tmp_path / "models" / "PWNED"), handle)
    assert_refused(toy, tmp_path, "unsafe_checkpoint", "only pickle weights", finetuned=adapter)
    assert not (tmp_path / "models" / "PWNED").exists()


def test_mismatched_architectures_are_refused(toy, other_toy, tmp_path):
    assert_refused(toy, tmp_path, "incompatible_checkpoints", "shape", finetuned=other_toy["full"])


def test_adapter_for_another_base_is_refused(toy, other_toy, tmp_path):
    assert_refused(
        toy, tmp_path, "incompatible_checkpoints", "was trained on", finetuned=other_toy["adapter"]
    )
    # Even when the name check is off, the LoRA shapes betray the wrong base.
    pipeline = RepairPipeline(RepairConfig(check_adapter_base_name=False))
    with pytest.raises(IncompatibleCheckpointsError, match="belongs to another base"):
        pipeline.prepare(toy["base"], other_toy["adapter"], toy["honesty"], toy["task"])


def test_adapter_as_base_is_refused(toy, tmp_path):
    assert_refused(toy, tmp_path, "invalid_checkpoint", "must be a full model", base=toy["adapter"])


def test_missing_directory_is_refused(toy, tmp_path):
    assert_refused(
        toy, tmp_path, "invalid_checkpoint", "not a directory", finetuned=tmp_path / "nope"
    )


def test_existing_output_is_never_overwritten(toy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    exit_code, output = run_cli(toy, out)
    assert exit_code == 2 and "[output_exists]" in output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--r-iw", "1.5"], "r_iw"),
        (["--compensation", "magic"], "compensation"),
        (["--device", "tpu"], "device"),
        (["--target-modules", "("], "not a valid regex"),
        (["--target-modules", "nothing_matches_this"], "matches no nn.Linear"),
    ],
)
def test_bad_options_are_refused(toy, tmp_path, flags, message):
    argv = repair_argv(toy, tmp_path / "out", *flags)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()
