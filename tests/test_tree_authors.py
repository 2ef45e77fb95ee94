"""Brinkmann et al.'s tree run as their code has it (abhay-sheshadri/backward-chaining-circuits): the edge order
networkx.topological_sort gives their adjacency-matrix trees, their loss mask, TransformerLens's block and draws,
CosineAnnealingLR stepped once per epoch, and the last short batch dropped."""

import json
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from probes.errors import ProbeError
from probes.models.custom import ProbeTransformerConfig
from probes.tasks.files import load_task
from probes.tasks.tree import make_tree
from probes.training.config import load_training_config, total_steps
from probes.training.data import IGNORE, tokenizer_for, tree_chance, tree_splits
from probes.training.schedules import cosine_per_epoch, epoch_lr
from probes.training.trainer import build_model, train

from .conftest import ROOT

AUTHORS = ROOT / "configs" / "training" / "tree-authors.yaml"
AUTHORS_2023 = ROOT / "configs" / "training" / "tree-authors-2023.yaml"


def their_edge_order(edges: list, nodes: int = 16) -> list:
    """gen.py's topological_sort_edges on the graph sample_tree_graph_secondary_path builds: a DiGraph from the
    adjacency matrix, networkx.topological_sort, then every (earlier, later) pair of that order that is an edge."""
    adj = np.zeros((nodes, nodes))
    for a, b in edges:
        adj[a, b] = 1
    graph = nx.DiGraph(incoming_graph_data=adj)
    order = list(nx.topological_sort(graph))
    return [(u, v) for i, u in enumerate(order) for v in order[i + 1:] if graph.has_edge(u, v)]


def test_topological_networkx_lists_the_edges_as_the_authors_code_does():
    differ = 0
    for index in range(300):
        ours = make_tree(0, index, 16, "forward", "networkx")
        bfs = make_tree(0, index, 16, "forward")
        assert (ours.root, ours.goal, ours.path, set(ours.edges)) == (bfs.root, bfs.goal, bfs.path, set(bfs.edges))
        assert list(ours.edges) == their_edge_order(list(ours.edges))
        assert make_tree(0, index, 16, "backward", "networkx").edges == ours.edges[::-1]
        mixed = make_tree(0, index, 16, "mixed", "networkx").edges  # even trees reversed, odd ones shuffled
        assert mixed == ours.edges[::-1] if index % 2 == 0 else sorted(mixed) == sorted(ours.edges)
        differ += bfs.edges != ours.edges
    assert differ > 150  # the project's own breadth-first order (children as attached) is another order
    with pytest.raises(ProbeError, match="unknown topological order 'dfs'; accepted: bfs, networkx"):
        make_tree(0, 0, 16, "forward", "dfs")


def test_the_authors_loss_scores_every_token_after_the_root_through_the_padding():
    cfg = load_training_config(AUTHORS, {"task.train": 6, "task.test": 2})
    tok = tokenizer_for(cfg["task"])
    rows = tree_splits(cfg["task"], tok)["train"]
    for index, row in enumerate(rows):
        tokens = make_tree(0, index, 16, "mixed", "networkx").tokens(16)
        ids = tok.convert_tokens_to_ids(tokens)
        # their dataset.py: mask[colon + 2:] over the 66 padded tokens; utils.train scores outputs[:, :-1] where
        # mask[:, 1:] holds, against tokens[:, 1:]
        mask = np.zeros(66, dtype=bool)
        mask[tokens.index(":") + 2:] = True
        scored = [p for p, t in enumerate(row["target"]) if t != IGNORE]
        assert scored == [p for p in range(65) if mask[p + 1]] == list(range(47, 65))
        assert [row["target"][p] for p in scored] == [ids[p + 1] for p in scored]
        assert row["input_ids"] == ids[:-1]
    path = tree_splits({**cfg["task"], "loss": "path"}, tok)["train"][0]["target"]
    assert sum(t != IGNORE for t in path) == len(make_tree(0, 0, 16, "mixed", "networkx").path) + 1  # unchanged
    assert tree_chance(cfg["task"]) == 10 / 18 and tree_chance({**cfg["task"], "loss": "path"}) == 1 / 16
    # the probing task of such a run reads the same tokens as its held-out rows
    task = load_task("tree-trained", {"first_tree": 6, "trees": 2, "topological": "networkx", "steps": "first"})
    test = tree_splits(cfg["task"], tok)["test"]
    for it, row in zip(task.items(), test):
        assert tok(it.prompt).input_ids == row["input_ids"][:48]


def moments(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.detach().flatten().double()
    return float(x.mean()), float(x.std()), float(((x - x.mean()) ** 4).mean() / x.std() ** 4)


def test_init_transformer_lens_draws_as_hooked_transformer_and_a_checkpoint_keeps_it(tmp_path):
    torch.manual_seed(0)
    config = ProbeTransformerConfig(vocab_size=36, n_positions=65, n_layer=6, n_embd=128, ffn=True, n_inner=512,
                                    norm=True, residual=True, lm_head_bias=True, init="transformer_lens")
    model = AutoModelForCausalLM.from_config(config)
    std = 0.8 / math.sqrt(128)  # HookedTransformerConfig: initializer_range -1 becomes 0.8 / sqrt(d_model)
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2:  # W_E, W_pos, W_Q/K/V, W_O, W_in, W_out, W_U
            mean, sd, kurtosis = moments(p)
            assert abs(mean) < 5 * std / math.sqrt(p.numel()) and abs(sd / std - 1) < 0.05, name
            assert abs(kurtosis - 3) < 0.3, name  # a normal, not truncated or uniform
        elif name.endswith("bias"):
            assert not p.any(), name  # b_Q..b_O, b_in, b_out, b_U and LayerNorm biases
        else:
            assert (p == 1).all(), name  # LayerNorm weights
    assert model.lm_head.bias is not None  # TransformerLens's b_U
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.config.init == "transformer_lens"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def hooked_transformer_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """HookedTransformer 1.10's forward written from its components (Embed, PosEmbed, TransformerBlock with LN,
    Attention, MLP with F.gelu, LayerNorm, Unembed) over this model's weights."""
    m, f = model.model, torch.nn.functional
    ln = lambda x, n: f.layer_norm(x, (x.shape[-1],), n.weight, n.bias, 1e-5)  # noqa: E731
    x = m.wte(ids) + m.wpe(torch.arange(ids.shape[1]))
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    for block in m.layers:
        q, k, v = f.linear(ln(x, block.norm1), block.attn.qkv.weight, block.attn.qkv.bias).split(128, -1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(128)).masked_fill(~causal, -math.inf)
        x = x + block.attn.out(scores.softmax(-1) @ v)
        lin, _, lout = block.mlp
        x = x + lout(f.gelu(lin(ln(x, block.norm2))))
    return model.lm_head(ln(x, m.norm))


def test_the_authors_configs_are_their_model_data_and_schedule():
    cfg = load_training_config(AUTHORS)
    t = cfg["train"]
    assert (t["epochs"], t["batch_size"], t["drop_last"], t["lr"], t["min_lr"]) == (1000, 64, True, 3e-4, 2e-6)
    assert total_steps(cfg) == 1000 * (135000 // 64) == 2_109_000  # 2,109 steps per epoch
    assert total_steps({**cfg, "train": {**t, "drop_last": False}}) == 1000 * 2110
    old = load_training_config(AUTHORS_2023)
    assert total_steps(old) == 100 * (154800 // 32) == 483_700 and old["task"]["train"] + old["task"]["test"] == 172000
    tok = tokenizer_for(cfg["task"])
    model = build_model(cfg, tok).eval()
    # HookedTransformer(n_layers 6, d_model 128, d_head 128, d_mlp 512, n_ctx 65, d_vocab 35): W_E, W_pos, per block
    # two LayerNorms, W_Q/K/V/O and their biases, W_in, b_in, W_out, b_out; the final LayerNorm, W_U and b_U
    theirs = 35 * 128 + 65 * 128 + 6 * (2 * 256 + 4 * (128 * 128 + 128) + 128 * 512 + 512 + 512 * 128 + 128) \
        + 256 + 128 * 35 + 35
    assert sum(p.numel() for p in model.parameters()) == theirs + 128 + 128 + 1 == 1_207_460  # <unk>'s row, column, bias
    assert model.config.n_positions == 65
    ids = torch.tensor([tok.convert_tokens_to_ids(make_tree(0, i, 16, "mixed", "networkx").tokens(16))[:-1]
                        for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hooked_transformer_logits(model, ids))


def test_cosine_per_epoch_is_cosine_annealing_stepped_once_per_epoch():
    epochs, per_epoch, lr, min_lr = 1000, 3, 3e-4, 2e-6
    theirs_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr)
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(theirs_opt, epochs, min_lr)
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr)
    ours = cosine_per_epoch(ours_opt, epochs * per_epoch, epochs, lr, min_lr)
    for epoch in range(epochs):
        want = theirs_opt.param_groups[0]["lr"]  # the rate of every step of this epoch (utils.train)
        assert epoch_lr(epoch, epochs, lr, min_lr) == pytest.approx(want, rel=1e-9, abs=1e-15)
        for _ in range(per_epoch):
            assert ours_opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15)
            ours_opt.step()
            ours.step()
        theirs_opt.step()
        theirs.step()
    assert ours_opt.param_groups[0]["lr"] == pytest.approx(min_lr)


def test_a_run_drops_each_epochs_last_short_batch_and_steps_its_cosine_per_epoch(tmp_path):
    small = {"model.n_layer": 1, "model.n_embd": 32, "model.n_inner": 64, "task.train": 100, "task.test": 16,
             "train.epochs": 3, "train.batch_size": 32, "train.eval_steps": 1, "train.log_steps": 1,
             "train.save_steps": 9}
    cfg = load_training_config(AUTHORS, small)
    run = train(cfg, tmp_path / "run", progress=False)
    log = pd.read_csv(run / "log.csv")
    assert log.step.max() == 9 == total_steps(cfg)  # 100 // 32 = 3 steps an epoch, not 4
    # Trainer logs the rate step s (1-based) took: that of its epoch, constant within one
    rates = log.dropna(subset=["learning_rate"]).set_index("step").learning_rate
    assert list(rates.index) == list(range(1, 10))
    for step, rate in rates.items():
        assert rate == pytest.approx(epoch_lr((step - 1) // 3, 3, 3e-4, 2e-6), rel=1e-6), step
    assert log.eval_accuracy.notna().sum() == 9  # the 16 test trees, evaluated though an eval batch is larger
    # a run stopped after its first step and resumed takes the same rates and ends with the same weights
    part = tmp_path / "windows"
    train(cfg, part, progress=False, minutes=0)
    assert json.loads((part / "meta.json").read_text())["steps"] == 1  # paused after step 1 (log_steps 1)
    train(cfg, part, resume=True, progress=False)
    again = pd.read_csv(part / "log.csv").dropna(subset=["learning_rate"]).set_index("step").learning_rate
    pd.testing.assert_series_equal(again, rates)
    whole, resumed = (AutoModelForCausalLM.from_pretrained(r).state_dict() for r in (run, part))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_decay_all_decays_every_parameter_as_torchs_adamw_on_model_parameters(tmp_path):
    """Their optimizer is AdamW(model.parameters(), weight_decay=0.01): biases, LayerNorms and embeddings decay too;
    three steps of the run equal three steps of that AdamW on the same batches."""
    from transformers import TrainerCallback

    small = {"model.n_layer": 1, "model.n_embd": 32, "model.n_inner": 64, "task.train": 96, "task.test": 16,
             "train.epochs": 1, "train.batch_size": 32, "train.eval_steps": 3, "train.save_steps": 3,
             "train.weight_decay": 50.0}  # lr x decay = 1.5% a step: far above the rounding of fused AdamW
    seen, runs = {}, {}

    class Capture(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 0:
                seen["before"] = {k: v.detach().clone() for k, v in model.named_parameters()}
                seen["groups"] = [(g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]

    for decay_all in (False, True):
        cfg = load_training_config(AUTHORS, {**small, "train.decay_all": decay_all})
        run = train(cfg, tmp_path / str(decay_all), progress=False, callbacks=[Capture()])
        n = len(seen["before"])
        decayed = sum(count for wd, count in seen["groups"] if wd == 50.0)
        assert (decayed == n) == decay_all and decayed >= 4
        runs[decay_all] = AutoModelForCausalLM.from_pretrained(run).state_dict()
    # theirs: AdamW over model.parameters() on the run's batches, with the run's rates (constant in epoch 0)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(run).config)
    model.load_state_dict(seen["before"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=50.0)
    tok = tokenizer_for(cfg["task"])
    rows = tree_splits(cfg["task"], tok)["train"]
    g = torch.Generator()
    g.manual_seed(0)
    order = torch.randperm(len(rows), generator=g).tolist()  # Trainer's RandomSampler, data_seed 0
    for step in range(3):
        batch = rows.__getitems__(order[32 * step: 32 * step + 32])
        logits = model(input_ids=batch["input_ids"]).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1),
                                          ignore_index=IGNORE).backward()
        opt.step()
        opt.zero_grad()
    theirs = model.state_dict()
    for k, v in theirs.items():
        torch.testing.assert_close(runs[True][k], v, rtol=1e-4, atol=2e-5)  # fused and loop AdamW round apart
    spared = max((runs[False][k] - v).abs().max().item() for k, v in theirs.items() if "norm" in k or "bias" in k)
    assert spared > 1e-3  # without decay_all the biases and LayerNorms miss their decay


def test_a_window_stops_at_the_first_log_step_past_its_time_not_at_an_evaluation(tmp_path):
    small = {"model.n_layer": 1, "model.n_embd": 32, "model.n_inner": 64, "task.train": 160, "task.test": 16,
             "train.epochs": 2, "train.batch_size": 32, "train.eval_steps": 10, "train.log_steps": 2,
             "train.save_steps": 10}
    cfg = load_training_config(AUTHORS, small)
    train(cfg, tmp_path / "w", progress=False, minutes=0)
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert (meta["status"], meta["steps"], meta["total_steps"]) == ("paused", 2, 10)
    assert (tmp_path / "w" / "checkpoint-2").is_dir()


@pytest.mark.parametrize("change, message", [
    ({"task.topological": "dfs"}, "task.topological 'dfs'; accepted: bfs, networkx"),
    ({"task.loss": "all"}, "task.loss 'all'; accepted: path, authors"),
    ({"train.drop_last": "yes"}, "train.drop_last 'yes' is not true or false"),
    ({"train.warmup_steps": 10}, "schedule cosine_per_epoch steps its cosine once per epoch, with no warm-up"),
    ({"train.steps": 100}, "accepted: train.epochs \\(not train.steps\\) and train.warmup_steps 0"),
    ({"train.schedule": "cosine"}, "train.min_lr goes with schedule cosine_with_min_lr or cosine_per_epoch"),
    ({"train.weight_decay": 0.0}, "train.decay_all true with weight_decay 0 decays nothing; accepted: a weight_decay > 0")])
def test_bad_authors_settings_are_one_line_errors(change, message):
    with pytest.raises(ProbeError, match=message):
        load_training_config(AUTHORS, change)


def test_the_probes_macro_f1_is_sklearns_the_authors_score():
    from sklearn.metrics import f1_score

    from probes.methods.linear_probe import _macro_f1

    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 5, (40, 30)), rng.integers(0, 8, (40, 30))  # classes 5-7 predicted, never true
    want = [f1_score(t, p, average="macro", zero_division=0) for t, p in zip(truth, pred)]  # their ClsProbe.get_acc
    np.testing.assert_allclose(_macro_f1(truth, pred), want, rtol=1e-12)  # vectorized over resamples
    assert _macro_f1(np.array([0, 0, 1]), np.array([0, 2, 1])) == pytest.approx(
        f1_score([0, 0, 1], [0, 2, 1], average="macro", zero_division=0)) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_the_linear_probe_reports_macro_f1_by_label_and_layer_with_its_controls(tree_run):
    import probes

    task = load_task("tree-trained", {"first_tree": 256, "trees": 120, "steps": "first"})
    result = probes.run(probes.load(str(tree_run)), task, "linear-probe", label="up0,up1")
    for s in result.summary["labels"].values():
        for r in s["layers"].values():
            assert all(0 <= r[f"{c}macro_f1"] <= 1 for c in ("", "shuffled_", "random_"))
    assert "held-out macro-F1 (the authors' score) by label and layer" in result.report
    assert "shuffled labels" in result.report and "random weights" in result.report and "(macro-F1 " in result.report


def test_path_attention_names_the_key_each_layer_reads_and_scores_the_backward_chain():
    from types import SimpleNamespace

    from probes.methods.tree_attention import report_path_attention, run_path_attention, summarize_path_attention, \
        word_roles

    task = load_task("tree-trained", {"trees": 12, "topological": "networkx"})
    items = [it for it in task.items() if it.extra["path_length"] >= 2]
    tok = tokenizer_for(load_training_config(AUTHORS)["task"])
    for it in items:
        words, roles = it.prompt.split(" "), word_roles(it)
        path = [int(v) for v in it.extra["path"].split()]
        assert len(roles) == len(words) and roles[44:48] == ["bar", "goal", "colon", "root"]
        for k, node in enumerate(reversed(path[1:])):  # the edge into the node k up: "parent >node"
            at = words.index(f">{node}")
            assert roles[at] == f"edge_up{k}" and roles[at - 1] == f"source_up{k}" and words[at - 1] == str(path[-2 - k])
        assert set(roles[48:]) <= {"path"} and roles.count("comma") == 14

    def weights(loaded, prompt):
        """Layer 0 reads the goal, layer 1 the edge into the goal, layer 2 the first comma (one head each)."""
        it = next(i for i in items if i.prompt == prompt)
        words, out = prompt.split(" "), []
        for at in (45, words.index(f">{it.extra['goal']}"), 2):
            w = torch.full((1, len(words), len(words)), 0.1 / (len(words) - 1))
            w[0, -1, at] = 0.9
            out.append(w)
        return out

    rows = run_path_attention(SimpleNamespace(tokenizer=tok), items, weights)
    summary = summarize_path_attention(pd.DataFrame(rows))
    for group in ("first", "later"):
        heads = summary["path_attention"][group]["heads"]
        assert [h["chain_role"] for h in heads.values()] == ["goal", "edge_up0", "edge_up1"]
        assert heads["L0H0"]["chain_top"] == 1 and heads["L1H0"]["chain_top"] == 1 and heads["L2H0"]["chain_top"] == 0
        assert heads["L0H0"]["chain_mass"] == pytest.approx(0.9) and heads["L2H0"]["top_roles"] == {"comma": 1.0}
        assert heads["L1H0"]["role_mass"]["edge_up0"] == pytest.approx(0.9)
        assert sum(heads["L1H0"]["role_mass"].values()) == pytest.approx(1.0)
    assert "edge_up0 is the top key in 1.00" in report_path_attention(None, summary)


def test_a_tokens_role_is_its_words_past_a_leading_space_and_special_tokens_have_their_own():
    """Byte-level BPE puts the space before a word into its token (' >' for '>'): the role is the word's, not the
    previous word's; a BOS token (no text) is 'special', not the first edge's source."""
    from probes.methods.tree_attention import token_role

    prompt = "a > b , c"
    words = prompt.split(" ")
    starts = [0, 2, 4, 6, 8]
    roles = ["w0", "w1", "w2", "w3", "w4"]
    assert [token_role(prompt, a, b, starts, roles) for a, b in [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9)]] == roles
    assert token_role(prompt, 0, 0, starts, roles) == "special" and len(words) == 5
