"""The data half of alpaca.py: template, tokens, loss boundary, masks, packing, plan, cache, dry run, errors.

Real assets only: 2,000 original Alpaca records, Meta's LLaMA tokenizer, and stories260K (a real tiny
Llama with a 512-piece tokenizer) for the packed-versus-padded loss and gradients.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import alpaca

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "tests", "assets")
SAMPLE = os.path.join(ASSETS, "alpaca", "alpaca_sample_2000.json")
LLAMA_TOK = os.path.join(ASSETS, "llama_tokenizer")
STORIES = os.path.join(ASSETS, "stories260K")
KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def records():
    return alpaca.load_records(SAMPLE)


@pytest.fixture(scope="module")
def sp():
    return alpaca.load_tokenizer(LLAMA_TOK)


@pytest.fixture(scope="module")
def tokenized(records, sp):
    return alpaca.tokenize_records(records, sp, max_len=512)


def ids_of(examples, i):
    return examples["tokens"][examples["offsets"][i]:examples["offsets"][i + 1]]


# ---------------------------------------------------------------------------------------------------------
# Template and tokens


def test_template_is_stanfords_character_for_character(sp):
    ref = json.load(open(os.path.join(LLAMA_TOK, "reference_encodings.json")))
    assert alpaca.PROMPT_DICT == ref["alpaca_PROMPT_DICT"]
    cases = {c["name"]: c for c in ref["cases"]}
    no_input = alpaca.format_prompt({"instruction": "Give three tips for staying healthy.", "output": "x"})
    assert no_input == cases["prompt_no_input(ex0)"]["text"]
    assert sp.encode(no_input) == cases["prompt_no_input(ex0)"]["ids"]
    assert alpaca.format_prompt({"instruction": "I", "input": "", "output": "o"}) == no_input.replace(
        "Give three tips for staying healthy.", "I")
    with_input = alpaca.format_prompt({"instruction": "Sum {x}.", "input": "2 and {3}", "output": "5"})
    assert with_input == ref["alpaca_PROMPT_DICT"]["prompt_input"].replace("{instruction}", "Sum {x}.").replace(
        "{input}", "2 and {3}")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' LlamaTokenizer on Meta's tokenizer.model, as Stanford's train.py used it (the
    SentencePiece-exact one). transformers 5 has no slow tokenizer; AutoTokenizer converts the model through
    protobuf into a `tokenizers` BPE that differs from SentencePiece on runs of spaces ("=  [[" gives
    "▁▁", "[[" instead of "▁", "▁[["). Built from transformers' own SentencePieceExtractor (vocab and merges),
    LlamaTokenizer agrees with SentencePiece, so that is the reference here."""
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor
    vocab, _, merges = SentencePieceExtractor(os.path.join(LLAMA_TOK, "tokenizer.model")).extract()
    tok = transformers.LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True,
                                      add_eos_token=False, model_max_length=4096)
    assert tok("Hello world")["input_ids"] == [1, 15043, 3186]  # BOS + SentencePiece, as Stanford used it
    return tok


def test_ids_equal_transformers_where_no_token_straddles_the_boundary(records, sp, hf_tokenizer):
    examples, _ = alpaca.tokenize_records(records, sp, max_len=100_000)
    assert list(examples["record"]) == list(range(len(records)))  # nothing dropped without truncation
    compared = 0
    for i, r in enumerate(records):
        prompt = alpaca.format_prompt(r)
        joint = hf_tokenizer(prompt + r["output"])["input_ids"]  # Stanford: source + target, one text
        p = hf_tokenizer(prompt)["input_ids"]
        if joint[:len(p)] != p:
            continue  # a token straddles the boundary: see the next test
        compared += 1
        ids = ids_of(examples, i)
        assert list(ids) == joint + [sp.eos_id()], r
        assert examples["loss_start"][i] == len(p)
    assert compared >= 0.95 * len(records)


def test_boundary_is_exact_when_the_output_starts_with_dash(records, sp, tokenized):
    examples, _ = alpaca.tokenize_records(records, sp, max_len=100_000)
    dash = [i for i, r in enumerate(records) if r["output"].startswith("-")]
    assert len(dash) == 31
    merged = 0
    for i in dash:
        prompt, output = alpaca.format_prompt(records[i]), records[i]["output"]
        ids, start = list(ids_of(examples, i)), examples["loss_start"][i]
        # The prompt part is the prompt exactly as encoded at inference time...
        assert ids[:start] == [sp.bos_id()] + sp.encode(prompt)
        # ...the output starts with a bare "-" (no dummy-prefix "▁-"), and decodes back to the output.
        assert sp.id_to_piece(ids[start]) == "-"
        assert sp.decode(ids[start:-1]) == output and ids[-1] == sp.eos_id()
        # Joint tokenization (Stanford's) would have merged across the boundary.
        merged += sp.encode(prompt + output)[:len(sp.encode(prompt))] != sp.encode(prompt)
    assert merged == len(dash)


def test_output_ids_decode_back_to_the_output(records, sp, tokenized):
    examples, stats = tokenized
    for n in range(0, stats["examples"], 7):
        ids, start, r = ids_of(examples, n), examples["loss_start"][n], records[examples["record"][n]]
        text = sp.decode([int(t) for t in ids[start:] if t != sp.eos_id()])
        assert r["output"].startswith(text) and (len(ids) == 512 or text == r["output"])


def test_truncation_and_dropping_are_counted(sp):
    recs = [{"instruction": "word " * 600, "output": "lost"},  # prompt alone exceeds max_len: dropped
            {"instruction": "Say hi.", "output": "hi " * 600},  # output cut: kept, no EOS
            {"instruction": "Say hi.", "input": "", "output": ""}]  # empty output: EOS only
    examples, stats = alpaca.tokenize_records(recs, sp, max_len=64)
    assert stats["records"] == 3 and stats["examples"] == 2 and stats["dropped"] == 1 and stats["truncated"] == 2
    assert list(examples["record"]) == [1, 2]
    lengths = alpaca.example_lengths(examples)
    assert lengths[0] == 64 and ids_of(examples, 0)[-1] != sp.eos_id()
    assert lengths[1] == examples["loss_start"][1] + 1 and ids_of(examples, 1)[-1] == sp.eos_id()
    assert stats["loss_tokens"] == int((lengths - examples["loss_start"]).sum())
    assert stats["tokens"] == int(lengths.sum())


# ---------------------------------------------------------------------------------------------------------
# Plan and batches


def batch_examples(b, r):
    """The examples of row r as (ids, segment slice) from the segment ids."""
    seg = b["segment_ids"][r]
    out = []
    for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all(), "a segment is not contiguous"
        out.append(slice(where[0], where[-1] + 1))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_masks_cover_exactly_output_and_eos(tokenized, pack):
    examples, _ = tokenized
    lengths = alpaca.example_lengths(examples)
    plan = alpaca.plan_steps(lengths, seed=1, rows_per_step=4 if pack else 16, seq_len=512, steps=3, pack=pack)
    by_tokens = {ids_of(examples, i).tobytes(): i for i in range(len(lengths))}
    for k in range(3):
        b = alpaca.make_batch(examples, plan, k)
        assert b["loss_mask"][b["segment_ids"] == 0].sum() == 0  # never on padding
        for r in range(b["tokens"].shape[0]):
            for sl in batch_examples(b, r):
                i = by_tokens[b["tokens"][r, sl].tobytes()]
                ids, start = ids_of(examples, i), examples["loss_start"][i]
                m = b["loss_mask"][r, sl] == 1.0
                # The loss sees exactly the output tokens and the EOS, in order, and no prompt token.
                assert list(b["targets"][r, sl][m]) == list(ids[start:])
                assert list(b["targets"][r, sl][:-1]) == list(ids[1:])
                assert not m[-1]  # the last token of an example predicts nothing (no crossing into the next)
                assert m.sum() == len(ids) - start


def test_packing_invariants_over_epochs(tokenized):
    examples, stats = tokenized
    lengths = alpaca.example_lengths(examples)
    R, T = alpaca.choose_rows_per_step(lengths, batch_size=16, seq_len=512, data_parallel=4), 512
    assert R % 4 == 0
    plan = alpaca.plan_steps(lengths, seed=3, rows_per_step=R, seq_len=T, epochs=2)
    assert plan["steps"] == 2 * plan["steps_per_epoch"] and list(plan["epoch"][[0, -1]]) == [0, 1]
    by_tokens = {ids_of(examples, i).tobytes(): i for i in range(len(lengths))}
    seen, used = {0: [], 1: []}, 0
    for k in range(plan["steps"]):
        b = alpaca.make_batch(examples, plan, k)
        assert set(b) == set(KEYS)
        for key in KEYS:
            assert b[key].shape == (R, T) and b[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
        for r in range(R):
            sls = batch_examples(b, r)
            end = sls[-1].stop if sls else 0
            assert [sl.start for sl in sls] == [0] + [sl.stop for sl in sls[:-1]]  # back to back from 0
            assert (b["segment_ids"][r, end:] == 0).all() and (b["tokens"][r, end:] == 0).all()
            assert (b["positions"][r, end:] == 0).all()
            for sl in sls:
                assert list(b["positions"][r, sl]) == list(range(sl.stop - sl.start))
                # a whole example, never a piece of one: its tokens are exactly one example's tokens
                seen[int(plan["epoch"][k])].append(by_tokens[b["tokens"][r, sl].tobytes()])
            used += end
    for e in (0, 1):
        assert sorted(seen[e]) == list(range(stats["examples"]))  # every example exactly once per epoch
    assert seen[0] != seen[1]  # a fresh order each epoch
    assert used / (plan["steps"] * R * T) > 0.9


def test_plan_is_a_function_of_seed_and_steps_cover_epochs(tokenized):
    lengths = alpaca.example_lengths(tokenized[0])
    kw = dict(rows_per_step=8, seq_len=512)
    a = alpaca.plan_steps(lengths, seed=0, epochs=1, **kw)
    b = alpaca.plan_steps(lengths, seed=0, epochs=1, **kw)
    c = alpaca.plan_steps(lengths, seed=1, epochs=1, **kw)
    assert all(np.array_equal(a[k], b[k]) for k in ("order", "row_start", "epoch"))
    assert not np.array_equal(a["order"], c["order"])
    n = a["steps"] + 5  # --steps beyond one epoch continues into the next epoch's order
    s = alpaca.plan_steps(lengths, seed=0, steps=n, **kw)
    assert s["steps"] == n and s["epoch"][-1] == 1 and s["row_start"].shape == (n * 8 + 1,)
    assert np.array_equal(s["order"][:len(a["order"])], a["order"])
    with pytest.raises(IndexError):
        alpaca.make_batch(tokenized[0], s, n)


def test_rows_per_step(tokenized):
    lengths = alpaca.example_lengths(tokenized[0])
    mean = lengths.mean()
    R = alpaca.choose_rows_per_step(lengths, batch_size=128, seq_len=2048, data_parallel=8)
    assert R % 8 == 0 and abs(R * 2048 * 0.99 / mean - 128) < 0.5 * 128
    assert alpaca.choose_rows_per_step(lengths, batch_size=96, seq_len=512, data_parallel=8, pack=False) == 96
    flags = alpaca.Config(seq_len=512, max_len=512)
    with pytest.raises(alpaca.InputError, match="--batch_size 100 with --no_pack"):
        alpaca.step_shape(alpaca.dataclasses.replace(flags, batch_size=100, no_pack=True), lengths, 8, 8)
    with pytest.raises(alpaca.InputError, match="all were dropped"):
        alpaca.step_shape(flags, lengths[:0], 8, 8)
    # Micro-batches split a step, they never change it: 32 rows over 8 devices in 2 passes of 16.
    padded = alpaca.dataclasses.replace(flags, batch_size=32, no_pack=True)
    assert alpaca.step_shape(alpaca.dataclasses.replace(padded, micro_batch_size=16), lengths, 8, 8) == (32, 2)
    assert alpaca.step_shape(padded, lengths, 8, 8) == (32, 1)
    with pytest.raises(alpaca.InputError, match=r"--micro_batch_size 12: .* valid here: \[8, 16, 32\]"):
        alpaca.step_shape(alpaca.dataclasses.replace(padded, micro_batch_size=12), lengths, 8, 8)
    # Rows planned for 8 devices (a resumed run's plan) split over 4 devices, but not over 16.
    assert alpaca.step_shape(padded, lengths, 8, 4) == (32, 1)
    with pytest.raises(alpaca.InputError, match="32 rows .* cannot be split over 64 devices"):
        alpaca.step_shape(padded, lengths, 8, 64)


def test_row_ranges_and_global_batch(tokenized):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    examples = tokenized[0]
    plan = alpaca.plan_steps(alpaca.example_lengths(examples), seed=0, rows_per_step=8, seq_len=512, steps=2)
    full = alpaca.make_batch(examples, plan, 1)
    part = alpaca.make_batch(examples, plan, 1, span=(2, 5))
    assert all(np.array_equal(part[k], full[k][2:5]) for k in KEYS)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data", None))
    g = alpaca.host_batch(examples, plan, sharding, 1)  # one process here (tests/test_multihost.py: several)
    assert all(np.array_equal(np.asarray(g[k]), full[k]) and g[k].sharding == sharding for k in KEYS)


def test_batch_of_step_k_is_the_same_in_a_fresh_process(records, sp):
    code = f"""
import hashlib, sys
sys.path.insert(0, {ROOT!r})
import alpaca
ex, _ = alpaca.tokenize_records(alpaca.load_records({SAMPLE!r}), alpaca.load_tokenizer({LLAMA_TOK!r}), 512)
plan = alpaca.plan_steps(alpaca.example_lengths(ex), seed=7, rows_per_step=8, seq_len=512, steps=300)
b = alpaca.make_batch(ex, plan, 271)
print(hashlib.sha256(b"".join(b[k].tobytes() for k in {KEYS!r})).hexdigest())
"""
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    ex, _ = alpaca.tokenize_records(records, sp, 512)
    plan = alpaca.plan_steps(alpaca.example_lengths(ex), seed=7, rows_per_step=8, seq_len=512, steps=300)
    b = alpaca.make_batch(ex, plan, 271)
    assert b["loss_mask"].sum() > 0 and plan["epoch"][271] > 0  # a step of a later epoch, not replayed
    assert out.stdout.strip() == hashlib.sha256(b"".join(b[k].tobytes() for k in KEYS)).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Cache


def test_cache_miss_then_hit_then_miss_on_any_change(records, sp, tmp_path):
    small = records[:300]
    e1, s1, hit1 = alpaca.tokenize_cached(small, sp, 512, str(tmp_path))
    e2, s2, hit2 = alpaca.tokenize_cached(small, sp, 512, str(tmp_path))
    assert (hit1, hit2) == (False, True) and s1 == s2
    assert all(np.array_equal(e1[k], e2[k]) and e1[k].dtype == e2[k].dtype for k in e1)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 1 and not files[0].endswith(".partial")  # written under a temp name, then renamed
    assert not alpaca.tokenize_cached(small, sp, 256, str(tmp_path))[2]  # max_len is in the key
    edited = [dict(small[0], output=small[0]["output"] + "!")] + small[1:]
    assert not alpaca.tokenize_cached(edited, sp, 512, str(tmp_path))[2]  # the data is in the key
    stories = alpaca.load_tokenizer(STORIES)
    assert not alpaca.tokenize_cached(small, stories, 512, str(tmp_path))[2]  # the tokenizer is in the key
    assert len(os.listdir(tmp_path)) == 4
    # A damaged cache file is recomputed, not trusted.
    (tmp_path / files[0]).write_bytes(b"garbage")
    e3, _, hit3 = alpaca.tokenize_cached(small, sp, 512, str(tmp_path))
    assert not hit3 and np.array_equal(e3["tokens"], e1["tokens"])
    assert alpaca.tokenize_cached(small, sp, 512, str(tmp_path))[2]


# ---------------------------------------------------------------------------------------------------------
# Command line: --help, --dry_run, bad input


def test_help_shows_every_flag_and_default(capsys):
    with pytest.raises(SystemExit):
        alpaca.parse_config(["--help"])
    text = capsys.readouterr().out
    for f in alpaca.dataclasses.fields(alpaca.Config):
        assert f"--{f.name}" in text
    assert text.count("(default:") >= len(alpaca.dataclasses.fields(alpaca.Config))
    c = alpaca.parse_config(["--lr", "3e-4", "--no_pack", "--steps", "5"])
    assert (c.lr, c.no_pack, c.steps, c.epochs, c.batch_size, c.max_len) == (3e-4, True, 5, 3, 128, 512)


def test_dry_run_prints_the_plan_and_the_memory_of_the_compiled_step(tmp_path, capsys):
    argv = ["--dry_run", "--data", SAMPLE, "--model", STORIES, "--cache_dir", str(tmp_path),
            "--seq_len", "512", "--batch_size", "16", "--data_parallel", "16", "--epochs", "1"]
    assert alpaca.main(argv) == 0
    out = capsys.readouterr()
    first = json.loads(out.out.strip())  # stdout is the one JSON line
    for key in ("examples", "dropped", "tokens", "loss_tokens", "rows_per_step", "examples_per_step",
                "packing_efficiency", "tokenize_seconds", "cache_hit"):
        assert key in first
    assert first["examples"] + first["dropped"] == 2000 and first["cache_hit"] is False
    assert first["rows_per_step"] % 16 == 0 and first["packing_efficiency"] > 0.9 and first["data_parallel"] == 16
    assert 0 < first["loss_tokens"] < first["tokens"]
    # XLA's figure for the step on the 8 devices here: at least the float32 weights, AdamW's moments and the
    # gradients of stories260K's 260,032 parameters, split 8 ways; no limit known on CPU.
    memory = first["memory"]
    assert memory["devices"] == 8 and memory["bytes_per_device"] > 16 * 260_032 / 8
    assert memory["limit_bytes"] is None and memory["fits"] is None
    assert f"memory: {memory['bytes_per_device'] / 1e9:.2f} GB per device" in out.err
    # Again: the tokenized data comes from the cache; a device of 1 MB is too small.
    assert alpaca.main(argv + ["--device_memory_gb", "0.001"]) == 0
    out = capsys.readouterr()
    again = json.loads(out.out.strip())
    assert again["cache_hit"] is True and "does NOT fit in 0.00 GB" in out.err
    assert again["memory"] == {**memory, "limit_bytes": 1e6, "fits": False}
    assert {k: v for k, v in again.items() if k not in ("cache_hit", "tokenize_seconds", "memory")} == \
        {k: v for k, v in first.items() if k not in ("cache_hit", "tokenize_seconds", "memory")}


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BAD_DATA = {
    "malformed_json": ("d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]',
                       r"d\.json: line 3 column .*malformed JSON"),
    "malformed_jsonl": ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n',
                        r"d\.jsonl: line 3: malformed JSON"),
    "missing_instruction": ("d.json", '[{"instruction": "a", "output": "b"}, {"output": "b"}]',
                            r"d\.json: record 1: missing field 'instruction'"),
    "missing_output": ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": "x"}\n',
                       r"d\.jsonl: line 2: missing field 'output'"),
    "non_string_field": ("d.json", '[{"instruction": "a", "input": 5, "output": "b"}]',
                         r"d\.json: record 0: field 'input' is int, not a string"),
    "not_a_list": ("d.json", '{"instruction": "a", "output": "b"}', r"expected a JSON list"),
    "empty_data_set": ("d.json", "[]", r"d\.json: the data set is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_gives_a_clear_message_and_exit_2(case, tmp_path, capsys):
    name, text, message = BAD_DATA[case]
    path = write(tmp_path, name, text)
    with pytest.raises(alpaca.InputError, match=message):
        alpaca.load_records(path)
    assert alpaca.main(["--dry_run", "--data", path, "--model", STORIES, "--seq_len", "512", "--cache_dir",
                        str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alpaca.py: error: ") and name in err


def test_a_persons_data_files_load_as_meant(records, tmp_path, capsys):
    some = records[:20]
    # A byte-order mark at the start, as Windows editors write: the same records.
    for name, text in (("bom.json", json.dumps(some)), ("bom.jsonl", "".join(json.dumps(r) + "\n" for r in some))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert alpaca.load_records(str(tmp_path / name)) == some
    # "input": null (some variants' missing input) is no input; another type is still named.
    with_null = [dict(r, input=None) if not r["input"] else r for r in some]
    assert with_null != some and alpaca.load_records(write(tmp_path, "null.json", json.dumps(with_null))) == some
    for value, kind in (("[\"x\"]", "list"), ("1.5", "float")):
        path = write(tmp_path, "bad.json", '[{"instruction": "a", "input": %s, "output": "b"}]' % value)
        with pytest.raises(alpaca.InputError, match=f"bad.json: record 0: field 'input' is {kind}, not a string"):
            alpaca.load_records(path)
    # A directory as --data.
    folder = tmp_path / "data"
    folder.mkdir()
    assert alpaca.main(["--dry_run", "--data", str(folder), "--model", STORIES, "--seq_len", "512", "--cache_dir",
                        str(tmp_path / "cache")]) == 2
    assert f"--data {folder}: a directory, not a data file" in capsys.readouterr().err


@pytest.mark.parametrize("tok,message", [("empty_dir", "no tokenizer.model in"),
                                         ("/no/such/tokenizer.model", "no such file"),
                                         ("not_sentencepiece", "not a SentencePiece model")])
def test_bad_tokenizer_gives_a_clear_message_and_exit_2(tok, message, tmp_path, capsys):
    if tok == "empty_dir":
        tok = str(tmp_path)
    elif tok == "not_sentencepiece":
        tok = write(tmp_path, "tokenizer.model", "hello")
    rc = alpaca.main(["--dry_run", "--data", SAMPLE, "--model", STORIES, "--seq_len", "512", "--tokenizer", tok,
                      "--cache_dir", str(tmp_path)])
    assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--seq_len", "256"], "--seq_len (256) must be at least --max_len"),
                                          (["--data", "/no/such.json"], "--data /no/such.json: no such file"),
                                          (["--preset", "nope"], "--preset nope: unknown")])
def test_bad_flags(argv, message, capsys):
    assert alpaca.main(["--dry_run", "--model", STORIES, "--seq_len", "512"] + argv) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Packed and padded batches train the same model


def test_packed_and_padded_give_the_same_loss_and_gradients(records):
    import jax
    import llama
    config, params = llama.load_hf(STORIES)
    examples, _ = alpaca.tokenize_records(records[:24], alpaca.load_tokenizer(STORIES), max_len=256)
    lengths = alpaca.example_lengths(examples)
    packed = alpaca.plan_steps(lengths, seed=0, rows_per_step=4, seq_len=512, epochs=1)
    padded = alpaca.plan_steps(lengths, seed=5, rows_per_step=8, seq_len=256, epochs=1, pack=False)
    assert packed["steps"] * 4 < padded["steps"] * 8  # fewer rows: the point of packing
    assert np.diff(packed["row_start"]).max() >= 2  # rows really hold several examples

    grad = jax.jit(jax.value_and_grad(lambda p, b: llama.loss_fn(p, b, config), has_aux=True))

    def epoch_sum(plan):  # summed loss, loss tokens and gradient of the summed loss over one epoch
        total = None
        for k in range(plan["steps"]):
            (loss, n), g = grad(params, alpaca.make_batch(examples, plan, k))
            step = (loss, n, g)
            total = step if total is None else jax.tree.map(lambda a, b: a + b, total, step)
        return total

    (l1, n1, g1), (l2, n2, g2) = epoch_sum(packed), epoch_sum(padded)
    assert n1 == n2 == int((lengths - examples["loss_start"]).sum())
    np.testing.assert_allclose(l1, l2, rtol=2e-5)
    assert 0.5 < float(l1 / n1) < 20
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(np.abs(b).max()))


def test_hub_ids_offline_and_unwritable_cache(tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: these must fail fast, never reach the network
    assert alpaca.main(["--dry_run", "--data", SAMPLE, "--model", "no-such-org/no-such-model"]) == 2
    assert "--model no-such-org/no-such-model: " in capsys.readouterr().err
    argv = ["--dry_run", "--data", SAMPLE, "--model", STORIES, "--seq_len", "512", "--tokenizer",
            "no-such-org/no-such-model"]
    assert alpaca.main(argv) == 2
    assert "tokenizer: no-such-org/no-such-model: not a local directory, and the Hub download failed" in \
        capsys.readouterr().err
    blocker = write(tmp_path, "file", "")  # a file where the cache directory should be
    argv = ["--dry_run", "--data", SAMPLE, "--model", STORIES, "--seq_len", "512", "--cache_dir",
            os.path.join(blocker, "cache")]
    assert alpaca.main(argv) == 2 and "--cache_dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Data from a URL: downloaded once, checked, cached; never half a file


class _Server:
    """A local HTTP server on 127.0.0.1: /sample.json serves the Alpaca sample, /cut.json announces all of
    it and sends half, /other.json serves other bytes; it counts the requests of each path."""

    def __init__(self):
        import http.server
        import threading
        body = open(SAMPLE, "rb").read()
        lines = "".join(json.dumps(r) + "\n" for r in json.loads(body)).encode()
        self.files = {"/sample.json": (body, len(body)), "/cut.json": (body[:len(body) // 2], len(body)),
                      "/sample.jsonl": (lines, len(lines)),
                      "/other.json": (b"[]", 2), "/page.json": (b"<html>Not found</html>", 22)}
        self.requests = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                if self.path not in server.files:
                    self.send_error(404)
                    return
                data, length = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def cached_files(cache):
    folder = os.path.join(cache, "downloads")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_url_data_is_downloaded_once_then_read_from_the_cache(server, records, tmp_path, monkeypatch):
    url = server.url + "/sample.json"
    monkeypatch.setitem(alpaca.PINNED_DOWNLOADS, url, alpaca.git_blob_id(SAMPLE))  # pinned, and right
    assert alpaca.load_records(url, str(tmp_path)) == records
    assert alpaca.load_records(url, str(tmp_path)) == records
    assert server.requests[url[len(server.url):]] == 1
    assert len(cached_files(tmp_path)) == 1 and cached_files(tmp_path)[0].endswith(".json")
    # A .jsonl URL is read as JSON lines (its download's temporary name ends in .partial, not .jsonl).
    assert alpaca.load_records(server.url + "/sample.jsonl", str(tmp_path)) == records


@pytest.mark.parametrize("path,message", [
    ("/cut.json", "the download stopped after|the download failed"),
    ("/missing.json", r"the download failed \(HTTPError"),
    ("/other.json", "has git blob id [0-9a-f]{40}, not the pinned " + "1232460f"),
    ("/sample.txt", "a URL must name a .json or .jsonl file"),
])
def test_cut_wrong_or_failed_downloads_are_named_and_leave_nothing(server, tmp_path, monkeypatch, path, message):
    url = server.url + path
    monkeypatch.setitem(alpaca.PINNED_DOWNLOADS, url, alpaca.git_blob_id(SAMPLE))
    with pytest.raises(alpaca.InputError, match=message) as e:
        alpaca.load_records(url, str(tmp_path))
    assert f"--data {url}" in str(e.value)
    assert cached_files(tmp_path) == []  # no entry, and no temporary file either
    assert alpaca.main(["--dry_run", "--data", url, "--model", STORIES, "--seq_len", "512", "--cache_dir",
                        str(tmp_path)]) == 2


def test_default_data_is_stanfords_file_at_a_pinned_commit_checked_by_its_blob_id():
    url = alpaca.Config().data
    assert url == alpaca.ALPACA_DATA_URL == ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
                                             "761dc5bfbdeeffa89b8bff5d038781a4055f796a/alpaca_data.json")
    assert alpaca.PINNED_DOWNLOADS[url] == "3779ddbc040543ab1834ef216c983d6fcc06cc9a"
    # The blob id is git's: what `git hash-object` prints for the file.
    blob = subprocess.run(["git", "hash-object", SAMPLE], capture_output=True, text=True)
    if blob.returncode == 0:
        assert alpaca.git_blob_id(SAMPLE) == blob.stdout.strip()
    body = open(SAMPLE, "rb").read()
    assert alpaca.git_blob_id(SAMPLE) == hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


def test_a_download_that_is_not_alpaca_data_is_named_and_not_kept(server, tmp_path):
    url = server.url + "/page.json"  # arrives whole (no pinned blob id for this URL), but is not Alpaca JSON
    for attempt in (1, 2):
        with pytest.raises(alpaca.InputError, match=f"--data {url}: the download is not Alpaca data: .*malformed"):
            alpaca.load_records(url, str(tmp_path))
        assert cached_files(tmp_path) == [] and server.requests["/page.json"] == attempt  # downloaded again
