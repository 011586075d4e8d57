"""The lm-evaluation-harness model (custom_llm.evaluation) against lm-eval's own HFLM on the Hugging Face
export of the same weights, on the local tasks of tests/data/eval_tasks (YAML + JSONL, offline)."""

import json
import math
from pathlib import Path

import pytest
import torch

from custom_llm import ModelConfig, Transformer
from custom_llm.checkpoint_io import save_model
from custom_llm.cli import main
from custom_llm.evaluation import scoring
from custom_llm.evaluation.scoring import plan_groups, score_requests, split_request

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'custom-llm[test]')")
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from custom_llm.evaluation.harness import CustomLLM  # noqa: E402

TASKS = Path(__file__).resolve().parent / "data" / "eval_tasks"
CONTEXT = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus() -> str:
    rows = [json.loads(line) for f in sorted(TASKS.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return "\n".join(" ".join([r.get("text", ""), r.get("question", ""), r.get("prompt", ""), *r.get("choices", [])])
                     for r in rows)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our LM on a checkpoint, HFLM on its Hugging Face export, tokenizer, model, checkpoint dir)."""
    from custom_llm.interop import export_hf
    from custom_llm.tokenizers import train_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_tokenizer([_corpus() * 4], kind="bpe", vocab_size=384)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=CONTEXT, tie_embeddings=False, init_std=0.1)
    model = Transformer(config).eval()
    save_model(model, root / "ckpt")
    tokenizer.save(root / "ckpt")
    export_hf(root / "ckpt", root / "hf")
    # Batch size 5 splits the four choices of a question across batches now and then: reuse must not need them together.
    ours = CustomLLM(ckpt=str(root / "ckpt"), device="cpu", batch_size=5)
    hf = HFLM(pretrained=str(root / "hf"), device="cpu", batch_size=5, dtype="float32", prefix_token_id=tokenizer.eos_id)
    assert hf.max_length == ours.max_length == CONTEXT and ours.prefix_token_id == tokenizer.eos_id
    return ours, hf, tokenizer, model, root / "ckpt"


@pytest.fixture(scope="module")
def local_tasks():
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def _close(a: float, b: float) -> bool:
    """Equal to 1e-4 (relative for a sum of many tokens' log-probabilities, which can reach hundreds of nats)."""
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


def test_local_tasks_match_hflm(pair, local_tasks):
    ours, hf, *_ = pair
    tasks = ["tiny_mc", "tiny_rolling", "tiny_next", "tiny_gen"]
    runs = [simple_evaluate(model=lm, tasks=tasks, task_manager=local_tasks, limit=8, bootstrap_iters=0)
            for lm in (ours, hf)]
    kinds = set()
    for task in tasks:
        for a, b in zip(runs[0]["samples"][task], runs[1]["samples"][task], strict=True):
            for (mine,), (theirs,) in zip(a["resps"], b["resps"], strict=True):
                if isinstance(theirs, tuple):  # loglikelihood: (log p, is_greedy)
                    assert _close(mine[0], theirs[0]) and mine[1] == theirs[1], (task, mine, theirs)
                    kinds.add("loglikelihood")
                elif isinstance(theirs, float):  # loglikelihood_rolling
                    assert _close(mine, theirs), (task, mine, theirs)
                    kinds.add("rolling")
                else:  # generate_until: the same greedy text
                    assert mine == theirs, (task, mine, theirs)
                    kinds.add("generate")
        for metric, value in runs[1]["results"][task].items():
            if isinstance(value, float):
                assert math.isclose(runs[0]["results"][task][metric], value, rel_tol=1e-4), (task, metric)
    assert kinds == {"loglikelihood", "rolling", "generate"}
    longest = max(len(pair[2].encode(d["doc"]["text"])) for d in runs[0]["samples"]["tiny_rolling"])
    assert longest > 2 * CONTEXT  # several rolling windows


def _token_requests(ours, tokenizer, model):
    """Token-level requests: truncated contexts, long continuations, a greedy continuation, a 1-token context."""
    from custom_llm.generation import generate

    doc = tokenizer.encode(" ".join(json.loads(line)["text"] for line in (TASKS / "docs_test.jsonl").read_text().splitlines()))
    assert len(doc) > 3 * CONTEXT
    greedy = generate(model, [doc[:20]], 12)[0]
    return [
        (doc[:150], doc[150:155]),  # context cut from the left
        (doc[:60], doc[60:70]),  # 70 tokens: the context loses 6
        (doc[:3], doc[3:3 + CONTEXT]),  # a continuation as long as the context window
        (doc[:20], greedy),  # exactly what greedy decoding produces: is_greedy
        (doc[:20], greedy[:1]),
        ([ours.prefix_token_id], doc[:7]),  # an empty context becomes the prefix token
        (doc[:40], doc[40:41]),
        (doc[:40], doc[41:44]),  # same context, other continuations: one shared prefix
    ]


def test_token_scores_match_hflm_including_truncation(pair):
    ours, hf, tokenizer, model, _ = pair
    requests = [(None, ctx, cont) for ctx, cont in _token_requests(ours, tokenizer, model)]
    mine = ours._loglikelihood_tokens(requests)
    theirs = hf._loglikelihood_tokens(requests)
    for (a, ga), (b, gb) in zip(mine, theirs, strict=True):
        assert _close(a, b) and ga == gb, (a, b, ga, gb)
    assert mine[3][1] and mine[4][1] and not mine[0][1]  # is_greedy both ways


def test_overlong_context_is_scored_on_its_last_tokens(pair):
    ours, _, tokenizer, model, _ = pair
    ctx, cont = _token_requests(ours, tokenizer, model)[0]
    kept = ctx[-(CONTEXT + 1 - len(cont)):]  # what fits: CONTEXT inputs predict the 5 continuation tokens
    assert score_requests(model, [(ctx, cont)], max_length=CONTEXT, batch_size=1) == \
        score_requests(model, [(kept, cont)], max_length=CONTEXT, batch_size=1)
    assert score_requests(model, [(ctx, cont)], max_length=CONTEXT, batch_size=1) != \
        score_requests(model, [(ctx[-20:], cont)], max_length=CONTEXT, batch_size=1)


@pytest.mark.parametrize("fields", [dict(), dict(sliding_window=8), dict(window_pattern="SL", sliding_window=6),
                                    dict(n_experts=4, moe_top_k=2, moe_ffn_dim=32)], ids=["dense", "window", "SL", "moe"])
def test_scoring_equals_a_full_forward_per_request(fields):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                    max_seq_len=24, init_std=0.1, **fields)).eval()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()  # noqa: E731
    shared = ids(15)
    requests = [(shared, ids(k)) for k in (1, 3, 6, 2)] + [(ids(n), ids(k)) for n, k in ((1, 5), (30, 4), (9, 24), (23, 2))]
    got = score_requests(model, requests, max_length=24, batch_size=3)
    for (ctx, cont), (logprob, greedy) in zip(requests, got, strict=True):
        inputs = (ctx + cont)[-25:][:-1]
        with torch.no_grad():
            logits = torch.log_softmax(model(torch.tensor([inputs]))[0, -len(cont):].float(), dim=-1)  # (c, V)
        expected = logits.gather(1, torch.tensor(cont).unsqueeze(1)).sum().item()
        assert abs(logprob - expected) < 1e-4, (ctx, cont, logprob, expected)
        assert greedy == (logits.argmax(-1).tolist() == cont)


def test_a_shared_context_runs_once(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32)).eval()
    prefills, tails = [], []
    real_prefill, real_tails = scoring.prefill, scoring._tail_logits
    monkeypatch.setattr(scoring, "prefill", lambda m, cache, tokens: prefills.append(tuple(tokens.shape))
                        or real_prefill(m, cache, tokens))
    monkeypatch.setattr(scoring, "_tail_logits", lambda *a: tails.append(len(a[3])) or real_tails(*a))
    questions = [list(range(i, i + 10 + i)) for i in range(3)]  # contexts of 10, 11, 12 tokens
    requests = [(q, [40 + c, 41]) for q in questions for c in range(4)]  # 3 questions x 4 choices
    score_requests(model, requests, max_length=32, batch_size=2)
    # Passes of at most 2 sequences: the two longest contexts together, then the third; the twelve
    # choices' one-token tails two rows at a time.
    assert prefills == [(2, 12), (1, 10)] and tails == [2] * 6
    items = [split_request(c, k, 32) for c, k in requests]
    assert [sorted(g) for g in plan_groups(items, 2)] == [list(range(4, 12)), list(range(4))]


def test_generate_until_honours_stop_strings(pair):
    ours, hf, *_ = pair
    free = ours.generate_until([Instance("generate_until", {}, ("one, two, three,", {"until": ["@@"], "max_gen_toks": 20}), 0)],
                               disable_tqdm=True)[0]
    stop = free[4:6]
    args = [("one, two, three,", {"until": ["@@never", stop], "max_gen_toks": 20}),
            ("The cat sat on the", {"until": ["\n"], "max_gen_toks": 9})]
    requests = [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
    mine = ours.generate_until(requests, disable_tqdm=True)
    assert mine[0] == free[:free.index(stop)]
    assert mine == hf.generate_until(requests, disable_tqdm=True)


def test_registered_for_lm_eval_by_name(pair, local_tasks):
    ours, _, _, _, ckpt = pair
    assert lm_eval.api.registry.get_model("custom-llm") is CustomLLM
    by_name = simple_evaluate(model="custom-llm", model_args=f"ckpt={ckpt},device=cpu,batch_size=3", tasks=["tiny_next"],
                              task_manager=local_tasks, bootstrap_iters=0, limit=4)
    samples = by_name["samples"]["tiny_next"]
    direct = ours.loglikelihood([Instance("loglikelihood", {}, tuple(s["arguments"][0]), 0) for s in samples], disable_tqdm=True)
    assert [s["resps"][0][0] for s in samples] == [pytest.approx(d) for d in direct]


@pytest.mark.slow  # lm-eval's CLI indexes its ~200 folders of built-in tasks first
def test_lm_eval_command_line_with_our_model(pair, monkeypatch, capsys):
    """``python -m custom_llm.evaluation``: lm-eval's own CLI, where ``--model custom-llm`` exists."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "custom-llm", "--model_args", f"ckpt={pair[4]}",
                                      "--device", "cpu", "--tasks", "tiny_next", "--include_path", str(TASKS),
                                      "--limit", "2"])
    runpy.run_module("custom_llm.evaluation", run_name="__main__")
    assert "|tiny_next" in capsys.readouterr().out


def test_cli_runs_a_local_multiple_choice_task(pair, tmp_path, capsys):
    ours, _, _, _, ckpt = pair
    out = tmp_path / "results.json"
    code = main(["eval", "--ckpt", str(ckpt), "--tasks", "tiny_mc", "--include", str(TASKS), "--device", "cpu",
                 "--batch-size", "7", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "|tiny_mc" in printed and "acc" in printed
    saved = json.loads(out.read_text())
    # Accuracy by hand: the choice with the highest log-likelihood, as the task's prompt format defines it.
    docs = [json.loads(line) for line in (TASKS / "mc_test.jsonl").read_text().splitlines()]
    assert len(docs) >= 30
    requests = [Instance("loglikelihood", d, (f"Question: {d['question']}\nAnswer:", f" {c}"), i)
                for d in docs for i, c in enumerate(d["choices"])]
    scores = [s for s, _ in ours.loglikelihood(requests, disable_tqdm=True)]
    right, start = 0, 0
    for d in docs:
        chunk = scores[start:start + len(d["choices"])]
        right += chunk.index(max(chunk)) == d["answer"]
        start += len(d["choices"])
    assert saved["results"]["tiny_mc"]["acc,none"] == pytest.approx(right / len(docs))
    assert saved["ckpt"] == str(ckpt)


def test_cli_runs_a_task_named_by_its_yaml_file(pair, capsys):
    assert main(["eval", "--ckpt", str(pair[4]), "--tasks", str(TASKS / "tiny_next.yaml"), "--limit", "2",
                 "--device", "cpu"]) == 0
    assert "|tiny_next" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task", "--include", str(TASKS)], "unknown task(s): no_such_task"),
    (["--tasks", "tiny_mc", "--include", str(TASKS), "--limit", "0"], "--limit must be > 0"),
    (["--tasks", "tiny_mc", "--include", str(TASKS / "missing")], "does not exist"),
    ([], "one of the arguments --data --tasks is required"),
])
def test_cli_errors_are_one_line(pair, capsys, argv, message):
    try:
        code = main(["eval", "--ckpt", str(pair[4]), "--device", "cpu", *argv])
    except SystemExit as exit:  # argparse's own errors (one line too, see cli.ArgumentParser)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
