"""`moekit analyze` end to end on a tiny random LanguageModel checkpoint and the shipped sample."""

import argparse
import json
import sys

import pytest
import torch

from moekit.analysis import cli
from moekit.analysis.health import routing_health
from moekit.analysis.report import Section, Table, Text, figure_block, loss_curves, render_report
from moekit.analysis.trace import load_trace
from moekit.data.domains import DOMAINS
from moekit.errors import MoekitError
from moekit.layer import MoE, MoEConfig
from moekit.models.lm import LanguageModel, LMConfig
from moekit.routing.spec import preset
from moekit.train.checkpoint import save_checkpoint


def save_tiny_run(root, seed=0):
    torch.manual_seed(seed)
    router = preset("qwen3_moe", 8, 2).with_(capacity_factor=1.0)
    moe = MoEConfig(hidden_size=32, ff_size=32, router=router)
    config = LMConfig(
        vocab_size=259, hidden_size=32, num_layers=2, num_heads=4, ff_size=64, max_seq_len=64, moe=moe
    )
    state = {
        "config": {"model": config.to_dict(), "data": {"source": "sample", "tokenizer": "byte"}},
        "step": 0,
    }
    return save_checkpoint(root / "checkpoints" / f"step-{seed}", LanguageModel(config), None, state)


def run(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args([str(a) for a in argv]))


def no_nan(text):
    def reject(constant):
        raise ValueError(f"metrics.json contains {constant}")

    return json.loads(text, parse_constant=reject)


def test_analyze_a_checkpoint_on_the_sample_corpus(tmp_path, capsys):
    save_tiny_run(tmp_path / "run", seed=0)
    other = save_tiny_run(tmp_path / "other", seed=1)
    out = tmp_path / "out"
    args = ["--out", out, "--batches", "10", "--batch-size", "2", "--seq-len", "48"]
    assert run(tmp_path / "run", *args, "--compare", other) == 0
    assert "wrote" in capsys.readouterr().out

    metrics = no_nan((out / "metrics.json").read_text())
    assert metrics["domains"] == list(DOMAINS)
    assert len(metrics["layers"]) == 2
    # every domain of the sample appears in the analysed batches (they alternate between domains)
    for layer in metrics["layers"]:
        assert all(sum(row) > 0 for row in layer["domains"]["counts"])
        assert 0.0 <= layer["domains"]["nmi_top1"] <= 1.0
        assert len(layer["cache"]["sizes"]) == 8
    # two differently initialised models route the same tokens differently
    assert all(layer["top1_agreement"] < 1.0 for layer in metrics["drift"]["layers"])

    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 5
    assert "http://" not in report and "https://" not in report and "<script" not in report
    for title in ("Experts by domain", "Expert load", "Capacity drops by position", "Routing drift"):
        assert title in report

    trace = load_trace(out / "trace")
    assert trace.num_tokens == metrics["summary"]["tokens"] <= 10 * 2 * 48
    assert trace.domain_names == DOMAINS
    assert load_trace(out / "trace-compare").num_tokens == trace.num_tokens

    # the saved trace is an input too, and gives the same metrics
    assert run(out / "trace", "--out", tmp_path / "again") == 0
    again = no_nan((tmp_path / "again" / "metrics.json").read_text())
    assert again["layers"] == metrics["layers"]


def test_analyze_text_files_labels_domains_from_the_data(tmp_path):
    save_tiny_run(tmp_path / "run")
    data = tmp_path / "data.jsonl"
    records = [{"text": "def f(x):\n    return x * 2\n" * 8, "domain": "python"}] * 3
    records += [{"text": "The quick brown fox jumps over the lazy dog. " * 8, "domain": "prose"}] * 3
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    assert run(tmp_path / "run", "--data", data, "--out", out, "--batches", "4", "--no-super-experts") == 0
    metrics = no_nan((out / "metrics.json").read_text())
    assert metrics["domains"] == ["python", "prose"]
    assert metrics["super_experts"] is None


def test_clear_errors(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(MoekitError, match="no checkpoint found"):
        run(tmp_path, "--out", out)
    save_tiny_run(tmp_path / "run")
    with pytest.raises(MoekitError, match="data not found"):
        run(tmp_path / "run", "--data", tmp_path / "nope.jsonl", "--out", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 3}\n')
    with pytest.raises(MoekitError, match="bad.jsonl:2: expected an object"):
        run(tmp_path / "run", "--data", bad, "--out", out)
    with pytest.raises(MoekitError, match="max_seq_len is 64"):
        run(tmp_path / "run", "--seq-len", "65", "--out", out)
    with pytest.raises(MoekitError, match="--segment-lengths"):
        run(tmp_path / "run", "--segment-lengths", "4,x", "--out", out)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "moekit.interop", None)  # interop not installed
    monkeypatch.setitem(sys.modules, "moekit.interop.hf", None)
    with pytest.raises(MoekitError, match="HF interop"):
        run(hf, "--out", out)


def test_seq_len_zero_is_refused_like_a_negative_one(tmp_path):
    save_tiny_run(tmp_path / "run")
    for value in ("0", "-5"):
        with pytest.raises(MoekitError, match=rf"^--seq-len: got {value}, expected a positive integer$"):
            run(tmp_path / "run", "--seq-len", value, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_data_shorter_than_one_sequence_is_refused(tmp_path):
    """An empty .txt file is one document of no text (its two markers): no routing to analyse."""
    save_tiny_run(tmp_path / "run")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    for data in (empty, short):
        with pytest.raises(MoekitError, match="fewer than one sequence") as info:
            run(tmp_path / "run", "--data", data, "--seq-len", "48", "--out", tmp_path / "out")
        message = str(info.value)
        assert (
            message.startswith(f"{data}: only ")
            and "(48 tokens, --seq-len)" in message
            and "\n" not in message
        )
    assert not (tmp_path / "out" / "metrics.json").exists()
    # one sequence's worth is enough
    short.write_text("enough words to fill a whole sequence of the model. " * 2)
    assert run(tmp_path / "run", "--data", short, "--seq-len", "48", "--out", tmp_path / "out") == 0


def test_report_with_extra_sections(tmp_path):
    """What the demo does: its own sections in front of the routing-health ones."""
    from moekit.analysis.recorder import record_routing
    from moekit.analysis.report import routing_health_sections

    model = LanguageModel(
        LMConfig(
            vocab_size=30,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            ff_size=32,
            max_seq_len=8,
            moe=MoEConfig(hidden_size=16, ff_size=8, router=preset("mixtral", 4, 2)),
        )
    )
    trace = record_routing(model, [{"input_ids": torch.randint(0, 30, (2, 8))}])
    health = routing_health(trace)
    curves = loss_curves({"moe": ([0, 1, 2], [3.0, 2.5, 2.2]), "dense": ([0, 1, 2], [3.0, 2.7, 2.5])})
    demo = Section(
        "Training <demo>", [Text("Loss & friends"), figure_block(curves), Table(["domain"], [["code"]])]
    )
    path = render_report([demo, *routing_health_sections(trace, health)], tmp_path / "r.html", title="demo")
    html = path.read_text()
    assert "Training &lt;demo&gt;" in html and "Loss &amp; friends" in html  # text is escaped
    assert html.index("Training &lt;demo&gt;") < html.index("Summary")
    assert "Experts by domain" not in html  # no domain labels recorded: the section is left out


class FakeHFModel(torch.nn.Module):
    """Stands in for what moekit.from_hf returns: HF-style forward, moekit MoE layers inside."""

    def __init__(self, vocab_size):
        super().__init__()
        config = MoEConfig(hidden_size=16, ff_size=8, router=preset("qwen2_moe", 4, 2))
        self.embed = torch.nn.Embedding(vocab_size, 16)
        self.layers = torch.nn.ModuleList([MoE(config), MoE(config)])
        self.seen_attention_mask = False

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.seen_attention_mask |= attention_mask is not None and bool((attention_mask == 0).any())
        x = self.embed(input_ids)
        for layer in self.layers:
            x = x + layer(x, None if attention_mask is None else attention_mask.bool())
        return x


WORDS = ["[UNK]", "<eos>", "the", "a", "def", "return", "x", "=", "+", "1", "2", "of", "and"]


def save_word_tokenizer(directory):
    """A tiny word-level tokenizer.json, as an HF checkpoint folder would carry."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def test_analyze_an_hf_directory_through_from_hf(tmp_path, monkeypatch):
    words = WORDS
    hf = tmp_path / "hf"
    hf.mkdir()
    save_word_tokenizer(hf)
    (hf / "config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": None}))
    model = FakeHFModel(len(words))
    loaded_from = []

    def from_hf(path):
        loaded_from.append(path)
        return model

    fake_interop = type(sys)("moekit.interop")
    fake_interop.from_hf = from_hf
    monkeypatch.setitem(sys.modules, "moekit.interop", fake_interop)
    out = tmp_path / "out"
    assert (
        run(hf, "--data", "sample", "--out", out, "--batches", "5", "--batch-size", "2", "--seq-len", "32")
        == 0
    )
    assert loaded_from == [hf]
    assert model.seen_attention_mask  # padded rows: the HF attention mask was passed
    metrics = no_nan((out / "metrics.json").read_text())
    assert [layer["name"] for layer in metrics["layers"]] == ["layers.0", "layers.1"]
    assert metrics["source"]["model_kind"] == "hf"
    trace = load_trace(out / "trace")
    assert int(trace.token_ids.max()) < len(words) and int(trace.positions.max()) < 32


def test_analyze_a_real_tiny_hf_checkpoint(tmp_path):
    """A transformers Qwen3-MoE checkpoint on disk, loaded by moekit.interop, analysed end to end."""
    pytest.importorskip("transformers")
    tiny = pytest.importorskip("moekit.interop.tiny")
    hf = tmp_path / "qwen3"
    tiny.tiny_model("qwen3_moe").save_pretrained(hf)
    save_word_tokenizer(hf)
    out = tmp_path / "out"
    assert (
        run(hf, "--data", "sample", "--out", out, "--batches", "5", "--batch-size", "2", "--seq-len", "32")
        == 0
    )
    metrics = no_nan((out / "metrics.json").read_text())
    assert metrics["source"]["model_kind"] == "hf" and len(metrics["layers"]) >= 1
    assert metrics["domains"] == list(DOMAINS)
    assert metrics["super_experts"] is not None
