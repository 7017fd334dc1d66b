"""`moekit generate` on a moekit run directory and on an HF folder, and the inputs it refuses."""

import json
import sys

import pytest
import torch

from moekit.cli import main
from moekit.inference.generate import generate
from moekit.layer import MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.spec import preset
from moekit.train.checkpoint import save_checkpoint

WORDS = ["[UNK]", "<eos>", "the", "a", "def", "return", "x", "=", "+", "1", "2", "of", "and"]


def save_run(root):
    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=32, ff_size=16, router=preset("qwen3_moe", 8, 2))
    config = LMConfig(
        vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, ff_size=48, max_seq_len=48, moe=moe
    )
    model = LanguageModel(config)
    state = {
        "config": {"model": config.to_dict(), "data": {"source": "sample", "tokenizer": "byte"}},
        "step": 0,
    }
    save_checkpoint(root / "checkpoints" / "step-0", model, None, state)
    return model.eval()


def save_word_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moekit: error: ")
    return err[0]


def test_generate_a_moekit_run_streams_and_writes_json(tmp_path, capsys):
    model = save_run(tmp_path / "run")
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "generate",
                str(tmp_path / "run"),
                "--prompt",
                "def f(x):",
                "--max-new-tokens",
                "6",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    prompt = [256, *b"def f(x):"]  # BOS first, as every training document starts
    expected = generate(model, torch.tensor([prompt]), max_new_tokens=6, eos_token_id=257)[0].tolist()
    assert result["prompt_ids"] == prompt and result["output_ids"] == expected
    assert result["new_tokens"] == len(expected) - len(prompt)
    assert result["tokens_per_second"] is None or result["tokens_per_second"] > 0
    assert [layer["layer"] for layer in result["routing"]] == [0, 1]
    for layer in result["routing"]:
        assert len(layer["experts"]) == result["new_tokens"]
        assert all(len(e) == 2 and len(set(e)) == 2 for e in layer["experts"])
        assert all(abs(sum(w) - 1) < 1e-4 for w in layer["weights"])  # qwen3: renormalised top-2
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == result["text"] or result["text"] == ""


def test_generate_an_hf_folder_samples_reproducibly(tmp_path, capsys):
    pytest.importorskip("transformers")
    from moekit.interop.hf import from_hf
    from moekit.interop.tiny import tiny_model

    hf = tmp_path / "olmoe"
    tiny_model("olmoe").save_pretrained(hf)
    save_word_tokenizer(hf)
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.json"
        argv = ["generate", str(hf), "--prompt", "the a x", "--max-new-tokens", "5", "--temperature", "0.7"]
        assert main([*argv, "--seed", "3", "--json", str(out), "--quiet"]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["output_ids"] == outs[1]["output_ids"] and outs[0]["options"]["do_sample"]
    assert (
        main(
            [
                "generate",
                str(hf),
                "--prompt",
                "the a x",
                "--max-new-tokens",
                "4",
                "--json",
                str(tmp_path / "g.json"),
            ]
        )
        == 0
    )
    greedy = json.loads((tmp_path / "g.json").read_text())
    expected = generate(from_hf(hf), torch.tensor([[2, 3, 6]]), max_new_tokens=4, eos_token_id=2)
    assert greedy["output_ids"] == expected[0].tolist()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    save_run(tmp_path / "run")
    run = str(tmp_path / "run")
    assert main(["generate", run, "--prompt", ""]) == 2
    assert "--prompt: empty" in error_line(capsys)
    assert main(["generate", run, "--prompt", "x" * 40, "--max-new-tokens", "9"]) == 2
    assert "context of 48" in error_line(capsys)
    assert main(["generate", run, "--prompt", "a", "--temperature", "0"]) == 2
    assert "--temperature" in error_line(capsys)
    assert main(["generate", run, "--prompt", "a", "--seed", "-1"]) == 2
    assert "--seed: got -1" in error_line(capsys)
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "a"]) == 2
    assert "no such file" in error_line(capsys)
    monkeypatch.setitem(sys.modules, "moekit.inference.offload", None)
    assert main(["generate", run, "--prompt", "a", "--offload-budget", "2GB"]) == 2
    assert "--offload-budget" in error_line(capsys)


def test_generate_takes_the_odp_options_and_prunes_the_prompt(tmp_path):
    model = save_run(tmp_path / "run")
    out = tmp_path / "odp.json"
    odp = ["--odp-skip-fraction", "0.5", "--odp-protect-fraction", "0.1", "--odp-importance", "position"]
    args = ["generate", str(tmp_path / "run"), "--prompt", "def f(x):", "--max-new-tokens", "3"]
    assert main([*args, *odp, "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    expected_options = {"threshold": 0.0, "skip_fraction": 0.5, "protect_fraction": 0.1}
    assert expected_options.items() <= result["odp"].items()
    from moekit.inference.methods import odp_overrides

    overrides = odp_overrides(0.0, skip_fraction=0.5, protect_fraction=0.1, importance="position")
    expected = generate(model, torch.tensor([result["prompt_ids"]]), max_new_tokens=3, overrides=overrides)
    assert result["output_ids"] == expected[0].tolist()
    assert result["odp"]["spare_last_token"] is True
    # the paper's literal rule, where the prompt's last token may skip its experts too
    literal = tmp_path / "literal.json"
    assert main([*args, *odp, "--odp-skip-last-token", "--quiet", "--json", str(literal)]) == 0
    assert json.loads(literal.read_text())["odp"]["spare_last_token"] is False
    overrides = odp_overrides(
        0.0, skip_fraction=0.5, protect_fraction=0.1, importance="position", spare_last_token=False
    )
    expected = generate(model, torch.tensor([result["prompt_ids"]]), max_new_tokens=3, overrides=overrides)
    assert json.loads(literal.read_text())["output_ids"] == expected[0].tolist()
    assert main([*args, "--quiet", "--json", str(tmp_path / "plain.json")]) == 0
    assert "odp" not in json.loads((tmp_path / "plain.json").read_text())


def test_bad_odp_options_are_one_line_and_exit_2(tmp_path, capsys):
    save_run(tmp_path / "run")
    run = str(tmp_path / "run")
    assert main(["generate", run, "--prompt", "a", "--odp-skip-fraction", "1.5"]) == 2
    assert "--odp-skip-fraction" in error_line(capsys)
    assert main(["generate", run, "--prompt", "a", "--odp-threshold", "-1"]) == 2
    assert "--odp-threshold" in error_line(capsys)
    assert (
        main(["generate", run, "--prompt", "a", "--odp-skipped-top-k", "-2", "--odp-skip-fraction", "0.1"])
        == 2
    )
    assert "--odp-skipped-top-k" in error_line(capsys)
    # more experts than the model's layers have: found at the first step, before any output
    argv = ["generate", run, "--prompt", "a", "--odp-skipped-top-k", "99", "--odp-skip-fraction", "0.1"]
    assert main([*argv, "--json", str(tmp_path / "g.json")]) == 2
    assert "--odp-skipped-top-k: got 99" in error_line(capsys) and not (tmp_path / "g.json").exists()


def test_hf_folders_without_tokenizer_or_moe_are_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from moekit.interop.tiny import tiny_model

    hf = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(hf)
    capsys.readouterr()  # transformers' progress bars
    assert main(["generate", str(hf), "--prompt", "the"]) == 2
    assert "no tokenizer.json" in error_line(capsys)
    dense = tmp_path / "llama"
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(config).save_pretrained(dense)
    save_word_tokenizer(dense)
    capsys.readouterr()
    assert main(["generate", str(dense), "--prompt", "the"]) == 2
    assert "llama" in error_line(capsys)


def test_generate_with_offloaded_experts_gives_the_in_memory_tokens(tmp_path):
    pytest.importorskip("transformers")
    from moekit.interop.tiny import tiny_model

    hf = tmp_path / "qwen3"
    tiny_model("qwen3_moe").save_pretrained(hf)
    save_word_tokenizer(hf)
    argv = ["generate", str(hf), "--prompt", "the a x def", "--max-new-tokens", "6", "--quiet"]
    assert main([*argv, "--json", str(tmp_path / "mem.json")]) == 0
    offloaded = [*argv, "--json", str(tmp_path / "off.json"), "--offload-budget", "50%"]
    assert main([*offloaded, "--offload-policy", "lru"]) == 0
    in_memory = json.loads((tmp_path / "mem.json").read_text())
    streamed = json.loads((tmp_path / "off.json").read_text())
    assert streamed["output_ids"] == in_memory["output_ids"]
    report = streamed["offload"]
    assert "offload" not in in_memory and 0.0 <= report["hit_rate"] <= 1.0
    assert report["bytes_read_per_token"] > 0


def test_generate_in_bf16_and_refuses_a_missing_gpu(tmp_path, capsys):
    save_run(tmp_path / "run")
    out = tmp_path / "bf16.json"
    argv = ["generate", str(tmp_path / "run"), "--prompt", "def x", "--max-new-tokens", "4", "--quiet"]
    assert main([*argv, "--dtype", "bf16", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dtype"] == "bf16" and result["device"] == "cpu" and result["new_tokens"] == 4
    if not torch.cuda.is_available():
        assert main([*argv, "--device", "cuda"]) == 2
        assert "--device" in error_line(capsys)
