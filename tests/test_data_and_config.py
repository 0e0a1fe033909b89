"""JSONL parsing/encoding and the validated configuration."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from hcnr_core import RepairConfig
from hcnr_core.config import RunOptions
from hcnr_core.data import (
    EncodedSample,
    encode_sample,
    load_jsonl,
    parse_jsonl,
    parse_sample,
    render_prompt,
)
from hcnr_core.errors import DataValidationError


@pytest.fixture(scope="module")
def tokenizer(toy):
    return AutoTokenizer.from_pretrained(toy["base"])


def test_both_shapes_parse_to_the_same_sample():
    chat = {
        "messages": [
            {"role": "user", "content": "who is bob ?"},
            {"role": "assistant", "content": "i do not know ."},
        ],
        "answerable": False,
        "answers": [],
    }
    plain = {"prompt": "who is bob ?", "response": "i do not know .", "answerable": False}
    a, b = parse_sample(chat), parse_sample(plain)
    assert a.messages == b.messages and a.response == b.response
    assert a.answerable is False and a.prompt_text == "who is bob ?"


def test_encoding_uses_chat_template_and_masks_the_prompt(tokenizer):
    sample = parse_sample(
        {
            "messages": [
                {"role": "system", "content": "be honest ."},
                {"role": "user", "content": "who is bob ?"},
                {"role": "assistant", "content": "i do not know ."},
            ]
        }
    )
    enc = encode_sample(tokenizer, sample, 128)
    prompt = tokenizer.apply_chat_template(
        list(sample.messages), add_generation_prompt=True, tokenize=False
    )
    assert (
        enc.input_ids[: enc.prompt_len] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )
    response = tokenizer("i do not know .", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[enc.prompt_len :] == [*response, tokenizer.eos_token_id]
    assert enc.input_ids[0] == tokenizer.bos_token_id  # from the template, not doubled
    assert enc.input_ids[1] != tokenizer.bos_token_id


def test_truncation_cuts_the_prompt_from_the_left_never_the_response(tokenizer):
    sample = parse_sample({"prompt": "who is " + "bob " * 50 + "?", "response": "paris ."})
    enc = encode_sample(tokenizer, sample, 16)
    assert len(enc.input_ids) == 16
    assert enc.response_len == 3  # "paris", ".", EOS
    # The kept prompt tokens are the *last* ones of the full prompt: the question's end and
    # the generation prompt survive (right truncation would keep "who is bob bob ...").
    full = tokenizer(render_prompt(tokenizer, sample.messages), add_special_tokens=False)
    assert enc.input_ids[: enc.prompt_len] == full["input_ids"][-enc.prompt_len :]
    assert enc.input_ids[: enc.prompt_len] != full["input_ids"][: enc.prompt_len]
    kept = tokenizer.decode(enc.input_ids[: enc.prompt_len])
    assert "?" in kept and kept.rstrip().endswith(tokenizer.decode(full["input_ids"][-2:]).strip())


def test_plain_template_without_chat_template(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    text = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert text == "<s>User: hi\nAssistant: "


def test_problems_are_collected_across_lines(tmp_path):
    good = json.dumps({"prompt": "q", "response": "a"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, "{", good, '{"prompt": "q"}', "", good]) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_jsonl(path)
    assert [line for line, _ in info.value.problems] == [2, 4]
    assert "line 2" in str(info.value) and "line 4" in str(info.value)


def test_deeply_nested_json_is_a_line_problem_not_a_crash():
    good = json.dumps({"prompt": "q", "response": "a"})
    nested = "[" * 200_000 + "]" * 200_000
    with pytest.raises(DataValidationError) as info:
        parse_jsonl(f"{good}\n{nested}\n".encode())
    assert info.value.problems == [(2, "JSON nested too deeply")]


def test_sample_count_and_size_limits():
    data = "\n".join(json.dumps({"prompt": "q", "response": "a"}) for _ in range(5)).encode()
    assert len(parse_jsonl(data, min_samples=5, max_samples=5)) == 5
    with pytest.raises(DataValidationError, match="at least 6"):
        parse_jsonl(data, min_samples=6)
    with pytest.raises(DataValidationError, match="at most 4"):
        parse_jsonl(data, max_samples=4)
    with pytest.raises(DataValidationError, match="limit 10"):
        parse_jsonl(data, max_bytes=10)


def test_config_is_frozen_and_strict(tmp_path):
    cfg = RepairConfig()
    assert (cfg.r_iw, cfg.r_cw, cfg.compensation, cfg.damping, cfg.seed) == (
        0.5,
        0.4,
        "paper",
        0.01,
        0,
    )
    with pytest.raises(ValidationError):
        cfg.r_iw = 0.3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        RepairConfig(r_iww=0.3)
    with pytest.raises(ValidationError, match=r"device: a run option.*RunOptions\(device="):
        RepairConfig(device="cuda")  # how to run moved out of the spec
    with pytest.raises(ValidationError, match="device"):
        RunOptions(device="gpu")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("r_iw: 0.3\ncompensation: exact\n")
    assert RepairConfig.from_file(yaml_file, r_cw=0.1).model_dump()["r_cw"] == 0.1
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"selection": "random", "seed": 3}))
    assert RepairConfig.from_file(json_file).selection == "random"
    json_file.write_text("[1]")
    with pytest.raises(ValueError, match="mapping"):
        RepairConfig.from_file(json_file)


def test_padding_falls_back_to_eos_never_to_a_made_up_id() -> None:
    from types import SimpleNamespace

    from hcnr_core.batching import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0  # 0 is a real pad


def test_one_collation_pads_right_for_training_and_left_for_generation():
    from hcnr_core.batching import IGNORE, collate, pad_rows

    rows = [[5, 6, 7], [8]]
    ids, mask = pad_rows(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows(rows, pad_id=0, side="left")  # last column: every last token
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = collate([EncodedSample([5, 6, 7], 1, 1), EncodedSample([8, 9], 1, 2)], pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_one_line_check_for_library_and_api_refuses_lone_surrogates():
    """The library (CLI) and the API's streaming upload check share `parse_line`: a lone
    surrogate escape is refused by both, with the same message and line number."""
    import io

    from api.services import validate_jsonl_stream
    from hcnr_core.errors import DataValidationError

    good = b'{"prompt": "q", "response": "a"}'
    data = b"\n".join([good, b'{"prompt": "q", "response": "ok \\udfff"}', good])
    with pytest.raises(DataValidationError) as library:
        parse_jsonl(data)
    with pytest.raises(DataValidationError) as api:
        validate_jsonl_stream(
            io.BytesIO(data), "<upload>", min_samples=1, max_samples=10, max_line_bytes=1000
        )
    assert library.value.problems == api.value.problems
    ((line, message),) = library.value.problems
    assert line == 2 and "lone surrogate" in message
