"""A mask that moves (fish_tuning.refresh): exact k every step, only kept entries move, never-kept ones stay at
init, the regrown entries are the brute-force best by the window's gradient bound, state migration, resume."""

import math

import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from fish_tuning.refresh import RefreshSchedule

SCHEDULE = RefreshSchedule(every=3, fraction=0.5, until=12, window=2)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    names = ft.peft_candidates(model)
    fisher = ft.compute_fisher(model, cls_batches(2, 8), num_samples=16, params=names, progress=False)
    heads = [n for n in ft.always_trainable(model)]
    scores = {**fisher, **{n: torch.zeros_like(model.get_parameter(n)) for n in heads}}
    mask = ft.select_mask(scores, keep=0.1, always_train=[f"^{n}$" for n in heads])
    return model, mask


def _optimizer(kind, model, mask, schedule=SCHEDULE):
    if kind == "sparse":
        return ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1, refresh=schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    return ft.MaskedOptimizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), mask, model, refresh=schedule)


def _step(model, opt, batch):
    model.train()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["sparse", "masked"])
def test_exact_k_only_kept_move_and_never_kept_stay_at_init(kind):
    model, mask = _setup()
    init = {n: model.get_parameter(n).detach().clone() for n in mask.names}
    opt = _optimizer(kind, model, mask)
    counts = {n: i.numel() for n, i in mask.indices.items()}
    ever = {n: mask.bool_mask(n).clone() for n in mask.names}
    batches = cls_batches(12, 8, seed=3)
    for batch in batches:
        in_force = opt.refresher.mask
        before = {n: model.get_parameter(n).detach().clone() for n in mask.names}
        _step(model, opt, batch)
        for n in mask.names:
            moved = model.get_parameter(n).detach() != before[n]
            assert not bool((moved & ~in_force.bool_mask(n)).any()), f"an entry not kept in this step moved ({n})"
            assert opt.refresher.mask.indices[n].numel() == counts[n]  # exactly k, per tensor, at every step
            ever[n] |= opt.refresher.mask.bool_mask(n)
    for n in mask.names:
        never = ~ever[n]
        assert torch.equal(model.get_parameter(n).detach()[never], init[n][never])
    history = opt.refresher.history
    assert [h["step"] for h in history] == [3, 6, 9] and all(h["dropped"] == h["regrown"] > 0 for h in history)
    assert history[0]["fraction"] == pytest.approx(0.5 * (1 - 3 / 12))
    assert opt.refresher.ever_kept() == pytest.approx(
        sum(int(e.sum()) for e in ever.values()) / mask.num_candidates)
    assert opt.refresher.ever_kept() > mask.num_selected / mask.num_candidates
    assert opt.refresher.mask.meta["refresh"]["history"] == history


def test_regrown_entries_are_the_brute_force_best_and_state_migrates():
    model, mask = _setup(1)
    full: dict[str, list[torch.Tensor]] = {n: [] for n in mask.names}
    for n in mask.names:  # registered before the guard's hook: sees each gradient before masking
        model.get_parameter(n).register_post_accumulate_grad_hook(
            lambda p, n=n: full[n].append(p.grad.detach().clone()))
    opt = _optimizer("sparse", model, mask, RefreshSchedule(every=3, fraction=0.5, until=12, window=2))
    before_idx = {n: mask.indices[n].clone() for n in mask.names}
    selected = {n: model.get_parameter(n).detach().reshape(-1)[before_idx[n]].clone() for n in mask.names}
    before_state = {}
    refresh = opt.refresher._refresh

    def spy():  # the optimizer state right before the refresh (after step 3's update)
        before_state.update({n: {k: v.clone() for k, v in opt.state[model.get_parameter(n)].items()}
                             for n in mask.names})
        refresh()

    opt.refresher._refresh = spy
    for batch in cls_batches(3, 8, seed=4):  # step 3: a refresh from the gradients of steps 2 and 3
        _step(model, opt, batch)
    assert before_state
    values = {n: model.get_parameter(n).detach().reshape(-1) for n in mask.names}
    for n in mask.names:
        idx, count = before_idx[n], before_idx[n].numel()
        k = round(opt.refresher.history[0]["fraction"] * count)
        g = torch.stack([x.reshape(-1) for x in full[n][1:3]]).double()  # the window: steps 2 and 3
        mean, var = g.mean(0), g.var(0, unbiased=True)
        score = mean.abs() - 1.65 * (var / 2).sqrt()
        score[idx] = -math.inf
        grow = sorted(range(score.numel()), key=lambda j: (-float(score[j]), j))[:k]
        change = (values[n][idx].double() - selected[n].double()).abs()  # the drop rule, brute force
        drop = {int(idx[j]) for j in sorted(range(count), key=lambda j: (float(change[j]), j))[:k]}
        new = opt.refresher.mask.indices[n]
        assert set(new.tolist()) == (set(idx.tolist()) - drop) | set(grow), n
        # SparseAdamW: staying entries keep their moments, regrown ones start at zero
        state = opt.state[model.get_parameter(n)]
        for key in ("exp_avg", "exp_avg_sq"):
            old = dict(zip(idx.tolist(), before_state[n][key].tolist()))
            for pos, j in enumerate(new.tolist()):
                if j in drop or j in grow:
                    assert j in grow and state[key][pos] == 0
                else:
                    assert state[key][pos] == old[j]
        assert opt.refresher.mask.num_selected == mask.num_selected


def test_masked_optimizer_resets_dropped_state_so_weight_decay_cannot_move_them():
    model, mask = _setup(2)
    opt = _optimizer("masked", model, mask)
    for batch in cls_batches(3, 8, seed=5):
        _step(model, opt, batch)
    new = opt.refresher.mask
    for n in mask.names:
        p = model.get_parameter(n)
        unkept = ~new.bool_mask(n)
        for key in ("exp_avg", "exp_avg_sq"):
            assert not bool(opt.state[p][key][unkept].any()), f"{key} of a dropped entry of {n} was kept"


@pytest.mark.parametrize("kind, stop", [("sparse", 7), ("masked", 8)])  # 8: inside a gradient window
def test_resume_from_a_state_dict_is_bit_identical(kind, stop, tmp_path):
    batches = cls_batches(12, 8, seed=6)
    model, mask = _setup()
    opt = _optimizer(kind, model, mask)
    for batch in batches:
        _step(model, opt, batch)
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, mask = _setup()
    opt = _optimizer(kind, model, mask)
    for batch in batches[:stop]:
        _step(model, opt, batch)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model, mask = _setup()  # a fresh process: the initial mask, then the checkpoint
    opt = _optimizer(kind, model, mask)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])  # dropout draws, as the Trainer's checkpoints restore them
    assert opt.refresher.step == stop and opt.refresher.mask.fingerprint() != mask.fingerprint()
    for batch in batches[stop:]:
        _step(model, opt, batch)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), straight[n]), n


def test_schedule_checks_and_refusals():
    with pytest.raises(ValueError, match="refresh_window"):
        RefreshSchedule(every=3, window=4)
    with pytest.raises(ValueError, match="refresh_until"):
        RefreshSchedule(every=5, until=2)
    assert RefreshSchedule(every=4).until == 40
    s = RefreshSchedule(every=4, until=12, window=2)
    assert [t for t in range(1, 14) if s.observes(t)] == [3, 4, 7, 8]  # no refresh at 12 (fraction 0 there)
    with pytest.raises(ValueError, match="refresh_every"):
        ft.FishConfig(keep=0.1, refresh_every=-1)


def test_regrown_moments_from_the_window_statistics():
    model, mask = _setup(3)
    full: dict[str, list[torch.Tensor]] = {n: [] for n in mask.names}
    for n in mask.names:
        model.get_parameter(n).register_post_accumulate_grad_hook(
            lambda p, n=n: full[n].append(p.grad.detach().clone()))
    opt = _optimizer("sparse", model, mask, RefreshSchedule(every=3, fraction=0.5, until=12, window=2,
                                                            regrow_state="stats"))
    before = {n: set(mask.indices[n].tolist()) for n in mask.names}
    for batch in cls_batches(3, 8, seed=7):
        _step(model, opt, batch)
    checked = 0
    for n in mask.names:
        g = torch.stack([x.reshape(-1) for x in full[n][1:3]])  # the window: steps 2 and 3
        new = opt.refresher.mask.indices[n].tolist()
        state = opt.state[model.get_parameter(n)]
        for pos, j in enumerate(new):
            if j not in before[n]:  # regrown: moments from the window, not zero
                torch.testing.assert_close(state["exp_avg"][pos], g[:, j].mean(), rtol=1e-5, atol=1e-12)
                torch.testing.assert_close(state["exp_avg_sq"][pos], g[:, j].square().mean(), rtol=1e-5, atol=1e-15)
                checked += 1
    assert checked > 0
