"""Generation: the cached decode step against the full model, greedy and beam search against
straightforward searches over full-prefix interpreter runs, bad inputs, the CLI, a compiled run."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TOLERANCE

import attngraph as ag
from attngraph import generate as G
from attngraph import reference
from attngraph.commands_generate import generate as generate_command
from attngraph.models.gpt import GPT
from attngraph.models.gpt import ZOO as GPT_ZOO
from attngraph.passes import optimize


def small_models():
    """Small vocabularies, so that searches meet ties and end-of-sequence often."""
    return {"seq2seq": ag.models.Transformer(vocab_size=8, d_model=16, num_heads=2, d_ff=32, num_layers=2,
                                             max_len=32, name="t-small"),
            "gpt": GPT(vocab_size=8, d_model=16, num_heads=2, d_ff=32, num_layers=2, max_len=32, name="gpt-small8")}


def tiny(kind):
    return ag.models.get("transformer-tiny") if kind == "seq2seq" else GPT_ZOO["gpt-tiny"]()


def params_of(model, seed=0):
    return ag.init_params(model, seed=seed, perturb=True)


class FullPrefix:
    """The next-token log-probs of a prefix, by running the full model on the whole prefix (no cache)."""

    def __init__(self, model, params, kind, bos_id=1):
        self.graph, self.params, self.kind, self.bos = ag.trace(model), params, kind, bos_id
        self.runs = 0
        self._memo = {}

    def __call__(self, source, tokens) -> np.ndarray:
        key = (tuple(source), tuple(tokens))
        if key not in self._memo:
            self.runs += 1
            if self.kind == "seq2seq":
                inputs = {"src": np.array([source]), "tgt": np.array([[self.bos, *tokens]])}
            else:
                inputs = {"tokens": np.array([[*source, *tokens]])}
            self._memo[key] = reference.run(self.graph, inputs, self.params, dtype="float64")["log_probs"][0, -1]
        return self._memo[key]


# -- the decode step -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cached_steps_match_the_full_model(kind, dtype):
    model = tiny(kind)
    params = params_of(model)
    full = ag.trace(model)
    stepper = G.InterpreterStepper(model, params, cache_len=12, dtype=dtype)
    rng = np.random.default_rng(1)
    src = rng.integers(1, 64, (3, 7))
    src[1, 4:] = 0  # padding in the middle of the batch
    tgt = rng.integers(1, 64, (3, 9))
    if kind == "seq2seq":
        want = reference.run(full, {"src": src, "tgt": tgt}, params, dtype="float64")["log_probs"]
        state = stepper.encode(src)
    else:
        want = reference.run(full, {"tokens": tgt}, params, dtype="float64")["log_probs"]
        state = stepper.encode(tgt)
    rtol, atol = TOLERANCE[dtype]
    # A prefill of 4 positions, then one token per step.
    got, state = stepper.step(tgt[:, :4], 0, state)
    np.testing.assert_allclose(got, want[:, 3], rtol=rtol, atol=atol)
    for i in range(4, 9):
        got, state = stepper.step(tgt[:, i:i + 1], i, state)
        np.testing.assert_allclose(got, want[:, i], rtol=rtol, atol=atol, err_msg=f"position {i}")


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
def test_decode_step_fuses_attention_and_keeps_its_meaning(kind):
    model = tiny(kind)
    params = params_of(model)
    graphs = G.trace_entries(model, cache_len=8)
    step = graphs["decode_step"]
    layers = 2
    attentions = layers * (2 if kind == "seq2seq" else 1)
    fused, _ = optimize(step, 3)
    assert fused.op_counts().get("fused_attention") == attentions
    assert fused.op_counts().get("update_slice") == 2 * layers
    # Every attention reads the caches in their (batch, len, heads, dim) layout: no transpose left.
    assert all(n.attrs["layout"] == "bshd" for n in fused.nodes() if n.op == "fused_attention")
    stepper = G.InterpreterStepper(model, params, cache_len=8, dtype="float64")
    state = stepper.encode(np.array([[5, 6, 7], [8, 9, 0]]) if kind == "seq2seq" else np.array([[1], [2]]))
    inputs = {"tokens": np.array([[3, 4], [5, 6]]), "pos": np.int64(2), **state}
    own = {k: params[k] for k in step.params}
    before = reference.run(step, inputs, own, dtype="float64")
    after = reference.run(fused, inputs, {k: params[k] for k in fused.params}, dtype="float64")
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-10, atol=1e-10, err_msg=name)


def test_reorder_and_expand_gather_rows_of_the_state():
    model = tiny("seq2seq")
    stepper = G.InterpreterStepper(model, params_of(model), cache_len=6)
    state = stepper.encode(np.array([[3, 4, 5], [6, 7, 0]]))
    _, state = stepper.step(np.array([[1], [2]]), 0, state)
    wide = stepper.expand(state, np.array([0, 0, 1, 1]))
    for name, value in state.items():
        np.testing.assert_array_equal(wide[name], value[[0, 0, 1, 1]], err_msg=name)
    swapped = stepper.reorder(wide, np.array([1, 0, 3, 3]))
    for name in stepper.info.caches:
        np.testing.assert_array_equal(swapped[name], wide[name][[1, 0, 3, 3]])
    for name in ("src_pad", "cross.0.k"):  # per-source state is left alone by reorder
        assert swapped[name] is wide[name]


# -- greedy and beam search ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 8, 20])
def test_row_top_takes_the_best_with_ties_to_the_lower_id(n):
    """A beam's candidates (repeated argmax up to 16, argpartition past it) equal a stable sort of each row:
    ties with the lowest ids, NaN never taken, -inf only where a row has fewer finite values than asked."""
    rng = np.random.default_rng(n)
    for _ in range(100):
        x = rng.integers(-4, 1, (6, 24)).astype(np.float32)
        x[rng.random(x.shape) < 0.15] = np.nan
        x[rng.random(x.shape) < 0.15] = -np.inf
        ids, values = G._row_top(x, n)
        for row, got_ids, got in zip(x, ids, values):
            clean = np.where(np.isnan(row), -np.inf, row)
            want = np.argsort(-clean, kind="stable")[:n]
            finite = np.isfinite(clean[want])
            np.testing.assert_array_equal(np.isfinite(got), finite)
            np.testing.assert_array_equal(got_ids[finite], want[finite])
            np.testing.assert_array_equal(got[finite], clean[want][finite])


def pick_eos(hyps, max_len):
    """A token that ends one source early and another later or never: EOS in the middle of a batch."""
    for tok in range(8):
        ends = [h.tokens.index(tok) if tok in h.tokens else max_len for h in hyps]
        if min(ends) < max_len - 2 and max(ends) > min(ends):
            return tok
    raise AssertionError("no token ends the sources at different steps; change the seed")


def sources_of(kind):
    if kind == "seq2seq":
        return [[3, 4, 5, 6, 7], [2, 5], [7, 7, 1]]
    return [[3, 4, 5], [2, 5, 6], [7, 7, 1]]


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
def test_greedy_is_the_argmax_chain_without_cache(kind):
    model = small_models()[kind]
    params = params_of(model, seed=3)
    stepper = G.InterpreterStepper(model, params, cache_len=12, dtype="float64")
    full = FullPrefix(model, params, kind)
    sources, max_len = sources_of(kind), 8
    eos = pick_eos(G.greedy_search(stepper, sources, max_len), max_len)
    got = G.greedy_search(stepper, sources, max_len, eos_id=eos)
    for source, hyp in zip(sources, got):
        tokens, total = [], 0.0
        while len(tokens) < max_len and (not tokens or tokens[-1] != eos):
            lp = full(source, tokens)
            tokens.append(int(np.argmax(lp)))
            total += lp[tokens[-1]]
        assert hyp.tokens == tokens
        assert hyp.finished == (tokens[-1] == eos)
        assert hyp.log_prob == pytest.approx(total, abs=1e-9)
    assert len({len(h.tokens) for h in got}) > 1, "EOS should end the sources at different steps"


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
def test_beam_one_equals_greedy(kind):
    model = small_models()[kind]
    stepper = G.InterpreterStepper(model, params_of(model, seed=3), cache_len=12)
    sources, max_len = sources_of(kind), 8
    eos = pick_eos(G.greedy_search(stepper, sources, max_len), max_len)
    greedy = G.greedy_search(stepper, sources, max_len, eos_id=eos, alpha=0.6)
    for early in (True, False):
        beam = G.beam_search(stepper, sources, 1, max_len, eos_id=eos, alpha=0.0 if not early else 0.6,
                             early_stopping=early)
        assert [b[0].tokens for b in beam] == [g.tokens for g in greedy]
        assert [b[0].log_prob for b in beam] == pytest.approx([g.log_prob for g in greedy], abs=1e-5)


def reference_beam_search(next_log_probs, beam, max_len, eos, alpha, early_stopping):
    """Beam search the plain way for one source, over full-prefix runs: (hypotheses, counts of the
    tied candidates and of the EOS candidates passed over because they ranked at or past ``beam``)."""
    lp = G.length_penalty
    live = [((), 0.0)]
    finished = []  # (score, tokens, log_prob, ended) in insertion order
    seen = {"ties": 0, "late_eos": 0}
    for length in range(1, max_len + 1):
        candidates = []
        for b, (tokens, total) in enumerate(live):
            for tok, value in enumerate(next_log_probs(tokens)):
                candidates.append((total + value, b, tok))
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        top = candidates[:2 * beam]
        seen["ties"] += sum(1 for x, y in zip(top, top[1:]) if x[0] == y[0])
        new_live = []
        for rank, (total, b, tok) in enumerate(top):
            tokens = live[b][0] + (tok,)
            if tok == eos:
                if rank < beam:
                    finished.append((total / lp(length, alpha), tokens, total, True))
                elif len(new_live) < beam:
                    seen["late_eos"] += 1
            elif len(new_live) < beam:
                new_live.append((tokens, total))
        if length == max_len:
            finished += [(total / lp(length, alpha), tokens, total, False) for tokens, total in new_live]
            break
        finished = sorted(finished, key=lambda f: -f[0])[:beam]
        live = new_live
        if not live:
            break
        if len(finished) == beam:
            best = max(total for _, total in live)
            reachable = max(best / lp(n, alpha) for n in range(length + 1, max_len + 1))
            if early_stopping or reachable <= finished[-1][0]:
                break
    return sorted(finished, key=lambda f: -f[0])[:beam], seen


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
@pytest.mark.parametrize("beam,alpha,early", [(2, 0.6, True), (3, 1.0, False), (3, 0.0, True)])
def test_beam_search_agrees_with_a_plain_beam_search(kind, beam, alpha, early):
    model = small_models()[kind]
    params = params_of(model, seed=3)
    stepper = G.InterpreterStepper(model, params, cache_len=12, dtype="float64")
    full = FullPrefix(model, params, kind)
    sources, max_len = sources_of(kind), 7
    eos = pick_eos(G.greedy_search(stepper, sources, max_len), max_len)
    got = G.beam_search(stepper, sources, beam, max_len, eos_id=eos, alpha=alpha, early_stopping=early)
    for source, hyps in zip(sources, got):
        want, _ = reference_beam_search(lambda t, source=source: full(source, t), beam, max_len, eos, alpha, early)
        assert [h.tokens for h in hyps] == [list(w[1]) for w in want]
        assert [h.finished for h in hyps] == [w[3] for w in want]
        np.testing.assert_allclose([h.score for h in hyps], [w[0] for w in want], rtol=1e-9, atol=1e-9)
    assert any(h.finished for hyps in got for h in hyps), "EOS should end some hypotheses"


def test_beam_search_breaks_ties_like_the_plain_search():
    # Two tokens with the same embedding row have the same logits (the output projection is tied):
    # every step then has exact ties, broken by the lower beam, then the lower token id.
    model = small_models()["seq2seq"]
    params = params_of(model, seed=3)
    params["src_embed.weight"][5] = params["src_embed.weight"][6]
    stepper = G.InterpreterStepper(model, params, cache_len=12, dtype="float64")
    full = FullPrefix(model, params, "seq2seq")
    sources, beam, max_len, eos = [[5, 6, 3], [6, 6, 2, 4]], 3, 6, 2
    got = G.beam_search(stepper, sources, beam, max_len, eos_id=eos, alpha=0.6, early_stopping=False)
    total_ties = 0
    for source, hyps in zip(sources, got):
        want, seen = reference_beam_search(lambda t, source=source: full(source, t), beam, max_len, eos, 0.6, False)
        total_ties += seen["ties"]
        assert [h.tokens for h in hyps] == [list(w[1]) for w in want]
    assert total_ties > 0, "the tied embedding rows should produce tied candidates"
    greedy = G.greedy_search(stepper, sources, max_len, eos_id=eos)
    assert all(6 not in g.tokens for g in greedy), "greedy takes the lower id of a tie"


@pytest.mark.parametrize("kind,seed,eos,early", [("seq2seq", 2, 5, True), ("seq2seq", 3, 5, True),
                                                 ("gpt", 3, 1, False)])
def test_an_eos_ranked_past_the_beam_does_not_finish(kind, seed, eos, early):
    # With these seeds and EOS ids, EOS candidates rank past the beam's width while the live beams
    # still fill, and finishing them would change the result: they are passed over (as is usual).
    model = small_models()[kind]
    params = params_of(model, seed=seed)
    stepper = G.InterpreterStepper(model, params, cache_len=12, dtype="float64")
    full = FullPrefix(model, params, kind)
    sources, beam, max_len = sources_of(kind), 3, 5
    got = G.beam_search(stepper, sources, beam, max_len, eos_id=eos, alpha=0.6, early_stopping=early)
    late = 0
    for source, hyps in zip(sources, got):
        want, seen = reference_beam_search(lambda t, source=source: full(source, t), beam, max_len, eos, 0.6, early)
        late += seen["late_eos"]
        assert [(h.tokens, h.finished) for h in hyps] == [(list(w[1]), w[3]) for w in want]
    assert late > 0


def test_generate_picks_greedy_or_the_best_beam():
    model = small_models()["gpt"]
    stepper = G.InterpreterStepper(model, params_of(model, seed=3), cache_len=12)
    sources = sources_of("gpt")
    assert [h.tokens for h in G.generate(stepper, sources, beam=1, max_len=5)] == \
        [h.tokens for h in G.greedy_search(stepper, sources, 5)]
    best = [hyps[0].tokens for hyps in G.beam_search(stepper, sources, 3, 5)]
    assert [h.tokens for h in G.generate(stepper, sources, beam=3, max_len=5)] == best


# -- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seq2seq_stepper():
    model = tiny("seq2seq")
    return G.InterpreterStepper(model, params_of(model), cache_len=8)


@pytest.mark.parametrize("call,message", [
    (lambda s: G.greedy_search(s, [[3, 4, 64]], 4), r"source 0, position 2: token id 64 is out of the vocabulary \(0..63\)"),
    (lambda s: G.greedy_search(s, [[3, 4], [-1]], 4), r"source 1, position 0: token id -1"),
    (lambda s: G.greedy_search(s, [[3, 4]], 9), r"need 9 cache positions, but the cache holds 8"),
    (lambda s: G.beam_search(s, [[3, 4]], 2, 9), r"need 9 cache positions, but the cache holds 8"),
    (lambda s: G.beam_search(s, [[3, 4]], 0, 4), r"beam must be at least 1"),
    (lambda s: G.greedy_search(s, [[3, 4]], 0), r"max_len must be at least 1"),
    (lambda s: G.greedy_search(s, [[3, 4]], 4, eos_id=70), r"eos_id 70 is out of the vocabulary"),
    (lambda s: G.greedy_search(s, [[]], 4), r"at least one token"),
    (lambda s: s.step(np.array([[3]]), 8, s.encode(np.array([[3, 4]]))), r"positions 8..8 are past the cache of 8"),
    (lambda s: s.step(np.array([[3, 99]]), 0, s.encode(np.array([[3, 4]]))), r"decoder input 0, position 1: token id 99"),
    (lambda s: s.encode(np.ones((1, 200), np.int64)), r"200 tokens are longer than the 128 positions"),
])
def test_bad_input_is_a_clear_error(seq2seq_stepper, call, message):
    with pytest.raises(G.GenerationError, match=message):
        call(seq2seq_stepper)


def test_bad_decoder_only_input_is_a_clear_error():
    model = tiny("gpt")
    stepper = G.InterpreterStepper(model, params_of(model), cache_len=8)
    with pytest.raises(G.GenerationError, match=r"prompt 0, position 1: token id 64 is out of the vocabulary"):
        G.greedy_search(stepper, [[1, 64]], 3)
    with pytest.raises(G.GenerationError, match=r"prompts in one batch must have one length"):
        G.greedy_search(stepper, [[1, 2], [3]], 3)
    with pytest.raises(G.GenerationError, match=r"a prefix of 5 token\(s\) and max_len 5 need 9 cache positions"):
        G.greedy_search(stepper, [[1, 2, 3, 4, 5]], 5)
    with pytest.raises(G.GenerationError, match=r"cache_len 65 is past the 64 positions gpt-tiny encodes"):
        G.InterpreterStepper(model, params_of(model), cache_len=65)
    with pytest.raises(G.GenerationError, match=r"has no decode_step entry"):
        G.InterpreterStepper(ag.models.get("encoder-tiny"), {}, cache_len=8)


# -- command line ----------------------------------------------------------------------------------

def test_cli_generates_and_reports_bad_input():
    runner = CliRunner()
    result = runner.invoke(generate_command, ["transformer-tiny", "--input", "3 14 15", "--input", "9 26",
                                              "--beam", "3", "--max-len", "5", "--nbest"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line[:1].isdigit()]
    assert [line.split(":")[0] for line in lines] == ["0.0", "0.1", "0.2", "1.0", "1.1", "1.2"]
    model = ag.models.get("transformer-tiny")
    stepper = G.InterpreterStepper(model, ag.init_params(model, 0), cache_len=5)
    best = G.beam_search(stepper, [[3, 14, 15], [9, 26]], 3, 5, eos_id=2)
    assert lines[0].split(":")[1].split("[")[0].split() == [str(t) for t in best[0][0].tokens]
    bad = runner.invoke(generate_command, ["transformer-tiny", "--input", "3 99"])
    assert bad.exit_code != 0 and "token id 99 is out of the vocabulary" in bad.output
    long = runner.invoke(generate_command, ["transformer-tiny", "--input", "3", "--max-len", "500"])
    assert long.exit_code != 0 and "cache" in long.output
    junk = runner.invoke(generate_command, ["transformer-tiny", "--input", "three"])
    assert junk.exit_code != 0 and "expected token ids" in junk.output
    unsaved = runner.invoke(generate_command, ["transformer-tiny", "--input", "3", "--save", "entries"])
    assert unsaved.exit_code == 2 and "--save keeps the compiled entries: it needs a compile target" in unsaved.output


# -- compiled --------------------------------------------------------------------------------------

def test_compiled_steps_match_the_interpreter(tmp_path):
    pytest.importorskip("tvm")
    model = tiny("seq2seq")
    params = params_of(model)
    manifest = G.CompiledStepper.build(model, params, str(tmp_path), "llvm", cache_len=8)
    assert manifest["cache_len"] == 8
    assert set(manifest["entries"]) == {"encode_entry", "decode_step", "reorder_cache", "expand_state"}
    compiled = G.CompiledStepper(str(tmp_path))
    oracle = G.InterpreterStepper(model, params, cache_len=8, dtype="float64")
    src = np.array([[3, 4, 5, 6], [7, 8, 0, 0]])
    a, b = compiled.encode(src), oracle.encode(src)
    rtol, atol = TOLERANCE["float32"]
    for pos, tokens in enumerate([[1, 1], [5, 9], [12, 3]]):
        la, a = compiled.step(np.array(tokens)[:, None], pos, a)
        lb, b = oracle.step(np.array(tokens)[:, None], pos, b)
        np.testing.assert_allclose(la, lb, rtol=rtol, atol=atol, err_msg=f"position {pos}")
    sources = [[3, 4, 5, 6], [7, 8]]
    assert [h.tokens for h in G.greedy_search(compiled, sources, 6)] == \
        [h.tokens for h in G.greedy_search(oracle, sources, 6)]
    assert [[h.tokens for h in hs] for hs in G.beam_search(compiled, sources, 2, 6, eos_id=2)] == \
        [[h.tokens for h in hs] for hs in G.beam_search(oracle, sources, 2, 6, eos_id=2)]
    with pytest.raises(G.GenerationError, match="past the cache of 8"):
        compiled.step(np.array([[1], [1]]), 8, a)
    # The saved entries as the CLI's MODEL: options that say how to compile must agree with the build.
    runner = CliRunner()
    ok = runner.invoke(generate_command, [str(tmp_path), "--input", "3 4", "--max-len", "3", "--target", "llvm",
                                          "--cache-len", "8"])
    assert ok.exit_code == 0, ok.output
    for option in (["--target", "vulkan"], ["--cache-len", "16"], ["--seed", "3"], ["--weight-dtype", "float16"]):
        bad = runner.invoke(generate_command, [str(tmp_path), "--input", "3 4", *option])
        assert bad.exit_code == 2 and f"Invalid value for {option[0]}: {tmp_path} is compiled already (llvm at -O3)" \
            in bad.output, (option, bad.output)
    # Entries of an older format (caches of a length fixed at the build) are refused, not misread.
    manifest_path = tmp_path / G.MANIFEST
    manifest_path.write_text(manifest_path.read_text().replace(f'"format": {G.FORMAT}', '"format": 1'))
    with pytest.raises(ag.api.ArtifactError, match="format 1 .* build them again"):
        G.CompiledStepper(str(tmp_path))
    old = runner.invoke(generate_command, [str(tmp_path), "--input", "3 4"])
    assert old.exit_code != 0 and "build them again" in old.output and "Traceback" not in old.output, old.output


@pytest.mark.parametrize("target", ["numpy", "llvm"])
def test_caches_grow_with_the_steps_and_reorders_reuse_their_memory(target):
    """The caches start with room for the first step, grow by GROW positions as the steps reach their end
    (the positions written kept), never past cache_len; a reorder writes into the caches the previous one
    consumed.  Every step's log-probs equal the full model's on the whole prefix."""
    if target == "llvm":
        pytest.importorskip("tvm")
    model = tiny("seq2seq")
    params = params_of(model)
    limit = 2 * G.GROW + 4
    stepper = G.compile_entries(model, params, target, cache_len=limit)
    full = ag.trace(model)
    rng = np.random.default_rng(5)
    src, tgt = rng.integers(1, 64, (2, 5)), rng.integers(1, 64, (2, limit))
    tgt[:, 0] = 1
    want = reference.run(full, {"src": src, "tgt": tgt}, params, dtype="float64")["log_probs"]
    state = stepper.encode(src)
    rtol, atol = TOLERANCE["float32"]
    lengths = []
    for pos in range(limit):
        got, state = stepper.step(tgt[:, pos:pos + 1], pos, state)
        lengths.append(state["cache.0.k"].shape[1])
        np.testing.assert_allclose(got, want[:, pos], rtol=rtol, atol=atol, err_msg=f"position {pos}")
        if pos == G.GROW + 2:  # swap the rows twice: the same state, in the memory the first swap consumed
            first = state["cache.1.v"]
            state = stepper.reorder(stepper.reorder(state, [1, 0]), [1, 0])
            assert target == "numpy" or state["cache.1.v"] is first
    assert lengths == [min(limit, G.GROW * (pos // G.GROW + 1)) for pos in range(limit)]
    with pytest.raises(G.GenerationError, match=f"past the cache of {limit}"):
        stepper.step(tgt[:, :1], limit, state)


def test_compiled_state_stays_on_the_device_and_caches_update_in_place():
    pytest.importorskip("tvm")
    from attngraph.inputs import is_device_tensor
    model = tiny("gpt")
    params = params_of(model)
    g = G.trace_entries(model, 8)["decode_step"]
    step = ag.compile(g, {k: params[k] for k in g.params})
    caches = [n for n, _ in g.outputs if n != "log_probs"]
    assert len(step.in_place) == len(caches)  # every cache write is in place
    oracle = G.InterpreterStepper(model, params, cache_len=8, dtype="float64")
    state = oracle.encode(np.array([[3, 4], [5, 6]]))
    device_state = {n: step.device.upload(v.astype(np.float32)) for n, v in state.items()}
    rtol, atol = TOLERANCE["float32"]
    for pos, tokens in enumerate([[1, 2], [7, 3]]):
        tokens = np.array(tokens)[:, None]
        out = step({"tokens": tokens, "pos": np.int64(pos), **device_state}, keep=caches)
        want, state = oracle.step(tokens, pos, state)
        assert isinstance(out["log_probs"], np.ndarray)
        for n in caches:  # the same tensors, written where they are
            assert is_device_tensor(out[n]) and out[n] is device_state[n]
            np.testing.assert_allclose(out[n].numpy(), state[n], rtol=rtol, atol=atol, err_msg=n)
        np.testing.assert_allclose(out["log_probs"][:, -1], want, rtol=rtol, atol=atol)
    # A NumPy cache is copied in: the caller's array is left as it was.
    zeros = {n: np.zeros_like(v) for n, v in state.items()}
    step({"tokens": np.array([[1], [2]]), "pos": np.int64(0), **zeros})
    assert not any(v.any() for v in zeros.values())
    with pytest.raises(KeyError, match="keep names no output"):
        step({"tokens": np.array([[1], [2]]), "pos": np.int64(0), **zeros}, keep=["nope"])


@pytest.mark.parametrize("kind,option,tolerance", [
    ("gpt", {"weight_dtype": "float16"}, 1e-2),  # float16's rounding of the weights
    # int8 (``generate --quantize int8``): the projections' weights per column, the rows at each step; the
    # quantization's error, not the arithmetic's (each kernel is checked against the same quantized arithmetic in
    # test_int8)
    ("seq2seq", {"quantize": "int8"}, 0.1)])
def test_compiled_steps_with_narrower_weights(tmp_path, kind, option, tolerance):
    pytest.importorskip("tvm")
    model = tiny(kind)
    params = params_of(model)
    manifest = G.CompiledStepper.build(model, params, str(tmp_path), "llvm", cache_len=8, **option)
    (name, value), = option.items()
    assert manifest[name] == value
    compiled = G.CompiledStepper(str(tmp_path))
    oracle = G.InterpreterStepper(model, params, cache_len=8, dtype="float64")
    src = np.array([[3, 4], [5, 6]] if kind == "gpt" else [[3, 4, 5], [6, 7, 0]])
    a, b = compiled.encode(src), oracle.encode(src)
    for pos, tokens in enumerate([[3, 5], [4, 6], [9, 1]]):
        la, a = compiled.step(np.array(tokens)[:, None], pos, a)
        lb, b = oracle.step(np.array(tokens)[:, None], pos, b)
        assert 0 < np.abs(la - lb).max() < tolerance, f"position {pos}"
    assert len(G.beam_search(compiled, src[:1].tolist(), 2, 6)[0]) == 2
    flag, other = (("--quantize", "none") if name == "quantize" else ("--weight-dtype", "float32"))
    runner = CliRunner()  # the saved entries as the CLI's MODEL: the option repeated, or not at all; not another
    for given, ok in (([f"--{name.replace('_', '-')}", value], True), ([], True), ([flag, other], False)):
        r = runner.invoke(generate_command, [str(tmp_path), "--input", "3 4", "--max-len", "3", *given])
        assert (r.exit_code == 0) == ok, (given, r.output)
    option_flag = [f"--{name.replace('_', '-')}", value]  # the interpreter (target numpy) compiles nothing
    r = runner.invoke(generate_command, ["transformer-tiny", "--input", "3 4", "--max-len", "3", *option_flag])
    assert r.exit_code == 2 and "applies to a compile target" in r.output, r.output


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compiled_steps_in_half_precision_match_the_rounding_interpreter(tmp_path, dtype):
    """``generate --dtype``: the entries built in a half type (weights, activations, caches and encoder memory
    stored in it, arithmetic in float32) step as the interpreter running the same half-precision entries
    (each value rounded as the build stores it), within the type's tolerance, and search the same tokens."""
    pytest.importorskip("tvm")
    from attngraph.ir.types import numpy_dtype
    from attngraph.numerics import TOLERANCE as HALF_TOLERANCE
    model = tiny("seq2seq")
    params = params_of(model)
    manifest = G.CompiledStepper.build(model, params, str(tmp_path), "llvm", cache_len=8, dtype=dtype)
    assert manifest["dtype"] == dtype
    compiled = G.CompiledStepper(str(tmp_path))
    oracle = G.InterpreterStepper(model, params, cache_len=8, dtype="float64", precision=dtype)
    src = np.array([[3, 4, 5, 6], [7, 8, 0, 0]])
    a, b = compiled.encode(src), oracle.encode(src)
    floats = [n for n, v in b.items() if v.dtype != bool]  # the caches and the encoder's keys and values
    assert set(a) == set(b) and len(floats) == 8 and all(b[n].dtype == numpy_dtype(dtype) for n in floats)
    assert all((a[n].numpy() if hasattr(a[n], "numpy") else a[n]).dtype == numpy_dtype(dtype) for n in floats)
    rtol, atol = HALF_TOLERANCE[dtype]
    for pos, tokens in enumerate([[1, 1], [5, 9], [12, 3]]):
        la, a = compiled.step(np.array(tokens)[:, None], pos, a)
        lb, b = oracle.step(np.array(tokens)[:, None], pos, b)
        assert la.dtype == np.float32
        np.testing.assert_allclose(la, lb, rtol=rtol, atol=atol, err_msg=f"position {pos}")
    sources = [[3, 4, 5, 6], [7, 8]]
    assert [h.tokens for h in G.greedy_search(compiled, sources, 6)] == \
        [h.tokens for h in G.greedy_search(oracle, sources, 6)]
    runner = CliRunner()
    other = "float16" if dtype == "bfloat16" else "bfloat16"
    ok = runner.invoke(generate_command, [str(tmp_path), "--input", "3 4", "--max-len", "3", "--dtype", dtype])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(generate_command, [str(tmp_path), "--input", "3 4", "--dtype", other])
    assert bad.exit_code == 2 and f"Invalid value for --dtype: {tmp_path} is compiled already" in bad.output, bad.output
    fresh = runner.invoke(generate_command, ["gpt-tiny", "--input", "3 4", "--max-len", "3", "--dtype", dtype])
    assert fresh.exit_code == 0 and fresh.output.startswith("0: "), fresh.output
