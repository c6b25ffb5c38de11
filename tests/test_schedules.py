import math
from itertools import pairwise

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blocks import ConfigError
from hybrids.training.schedules import DECAY_SHAPES, SCHEDULES, ScheduleConfig, build_schedule

approx = pytest.approx


def schedule(total=100, tokens_per_step=1, **kwargs):
    return build_schedule(ScheduleConfig(**kwargs), total, tokens_per_step)


def test_warmup_is_linear_from_one_step_and_reaches_peak_at_warmup_end():
    s = schedule(name="constant", warmup_steps=10)
    assert [s.lr_factor(i) for i in range(12)] == approx([0.1 * (i + 1) for i in range(10)] + [1.0, 1.0])
    assert schedule(name="constant").lr_factor(0) == 1.0  # no warmup: the peak from step 0


def test_cosine_exact_values():
    s = schedule(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert s.lr_factor(10) == 1.0
    assert s.lr_factor(99) == 0.1
    # the decay spans steps 10..99: its midpoint 54.5 lies between two steps, symmetric about (1 + min) / 2
    assert (s.lr_factor(54) + s.lr_factor(55)) / 2 == approx(0.55)
    assert s.lr_factor(10 + 89 // 3) == approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 29 / 89)))
    odd = schedule(total=111, name="cosine", warmup_steps=10, min_lr_ratio=0.2)
    assert odd.lr_factor(60) == approx(0.6)
    steps = [s.lr_factor(i) for i in range(10, 100)]
    assert all(a > b for a, b in pairwise(steps))


def test_linear_and_exp_decay_exact_values():
    linear = schedule(name="linear", warmup_steps=10, min_lr_ratio=0.1)
    assert [linear.lr_factor(i) for i in (9, 10, 40, 99)] == approx([1.0, 1.0, 1.0 - 0.9 * 30 / 89, 0.1])
    exp = schedule(name="exp", warmup_steps=10, min_lr_ratio=0.01)
    assert [exp.lr_factor(i) for i in (10, 99)] == [1.0, 0.01]
    assert exp.lr_factor(10 + 89 // 2) == approx(0.01 ** (44 / 89))  # geometric: log-linear in the step
    for s in (linear, exp):
        steps = [s.lr_factor(i) for i in range(10, 100)]
        assert all(a > b for a, b in pairwise(steps))


def test_step_decay_holds_equal_factor_stages():
    s = schedule(name="step", warmup_steps=10, min_lr_ratio=0.01, step_drops=2)
    # steps 10..99 (90) in 3 stages of 30: 1.0, 0.1, 0.01
    assert [s.lr_factor(i) for i in (9, 10, 39, 40, 69, 70, 99)] == approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    assert len({s.lr_factor(i) for i in range(10, 100)}) == 3
    odd = schedule(total=11, name="step", min_lr_ratio=0.25, step_drops=2)  # 11 steps: stages of 4, 4, 3
    assert [odd.lr_factor(i) for i in range(11)] == approx([1.0] * 4 + [0.5] * 4 + [0.25] * 3)
    assert {3, 4, 7, 8} <= {r[0] for r in odd.curve(n_points=2)}  # the drops are breakpoints


def test_wsd_exact_values():
    s = schedule(name="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert all(s.lr_factor(i) == 1.0 for i in range(9, 81))  # stable, and the decay starts at 1.0 on step 80
    assert s.lr_factor(81) == approx(1 - 0.9 / 19)
    assert s.lr_factor(90) == approx(1 - 0.9 * 10 / 19)
    assert s.lr_factor(99) == 0.1
    assert s.phase2_start_step is None


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_wsd_decay_shapes_end_at_min(shape):
    s = schedule(name="wsd", decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.1)
    assert s.lr_factor(80) == 1.0 and s.lr_factor(99) == 0.1
    if shape == "exp":  # geometric: a constant ratio per step
        ratios = [s.lr_factor(i + 1) / s.lr_factor(i) for i in range(80, 99)]
        assert ratios == approx([0.1 ** (1 / 19)] * 19)
    if shape == "cosine":
        assert s.lr_factor(81) == approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 19)))


def test_wsd_without_decay_stays_at_peak():
    s = schedule(name="wsd", decay_fraction=0.0)
    assert s.lr_factor(99) == 1.0


TWO_PHASE = dict(name="two_phase", warmup_steps=10, phase1_shape="cosine", phase1_min_ratio=0.1, phase2_start=0.8,
                 rewarm_steps=10, rewarm_ratio=0.5, decay_shape="linear", min_lr_ratio=0.05, replay_fraction=0.3)


def test_two_phase_exact_values():
    s = schedule(**TWO_PHASE)
    assert s.phase2_start_step == 80
    assert s.phase(79) == 1 and s.phase(80) == 2 and s.phase(99) == 2
    assert s.lr_factor(9) == 1.0 and s.lr_factor(10) == 1.0
    assert s.lr_factor(79) == 0.1  # phase 1's cosine ends at phase1_min_ratio on its last step
    assert s.lr_factor(44) + s.lr_factor(45) == approx(1.1)  # phase-1 cosine over 10..79, symmetric about 0.55
    assert s.lr_factor(80) == 0.1  # the re-warm starts from the phase-1 end: continuous
    assert s.lr_factor(85) == approx(0.3)
    assert s.lr_factor(90) == 0.5
    assert s.lr_factor(95) == approx(0.5 - 0.45 * 5 / 9)
    assert s.lr_factor(99) == 0.05
    anneal = [s.lr_factor(i) for i in range(90, 100)]
    assert all(a > b for a, b in pairwise(anneal))


def test_two_phase_constant_phase1_and_exp_anneal():
    s = schedule(**{**TWO_PHASE, "phase1_shape": "constant", "decay_shape": "exp"})
    assert all(s.lr_factor(i) == 1.0 for i in range(9, 81))
    assert s.lr_factor(85) == approx(0.75)  # re-warm from 1.0 down to 0.5
    assert s.lr_factor(90) == 0.5 and s.lr_factor(99) == 0.05
    ratios = [s.lr_factor(i + 1) / s.lr_factor(i) for i in range(90, 99)]
    assert ratios == approx([0.1 ** (1 / 9)] * 9)


def test_two_phase_without_rewarm_jumps_to_rewarm_ratio():
    s = schedule(**{**TWO_PHASE, "rewarm_steps": 0})
    assert s.lr_factor(79) == 0.1 and s.lr_factor(80) == 0.5 and s.lr_factor(99) == 0.05


def test_phase2_start_as_token_count():
    s = schedule(tokens_per_step=1000, **{**TWO_PHASE, "phase2_start": 80_000})
    assert s.phase2_start_step == 80
    # the first step that starts at or after 80,500 tokens is step 81 (it starts at 81,000)
    assert schedule(tokens_per_step=1000, **{**TWO_PHASE, "phase2_start": 80_500}).phase2_start_step == 81
    assert schedule(**{**TWO_PHASE, "phase2_start": 0.5}).phase2_start_step == 50
    assert schedule(**{**TWO_PHASE, "phase2_start": 0.805}).phase2_start_step == 81  # 80.5 rounds half up


def test_phase2_fraction_and_phase():
    s = schedule(**TWO_PHASE)
    assert [s.phase2_fraction(i) for i in (0, 79)] == [0.0, 0.0]
    assert [s.phase2_fraction(i) for i in (80, 99)] == approx([0.7, 0.7])
    for name in ("cosine", "wsd", "constant"):
        other = schedule(name=name)
        assert other.phase2_start_step is None
        assert {other.phase(i) for i in range(100)} == {1}
        assert {other.phase2_fraction(i) for i in range(100)} == {0.0}


def test_steps_past_the_end_hold_the_last_values_and_negative_steps_raise():
    s = schedule(**TWO_PHASE)
    assert s.lr_factor(100) == s.lr_factor(10_000) == 0.05 and s.phase(100) == 2
    assert s.lr_factor(torch.tensor(99)) == 0.05
    with pytest.raises(ValueError, match="step"):
        s.lr_factor(-1)
    with pytest.raises(ValueError, match="step"):
        s.lr_factor(1.5)


def test_curve_keeps_breakpoints():
    s = schedule(**TWO_PHASE)
    rows = s.curve()
    assert [r[0] for r in rows] == list(range(100))
    assert rows[85] == (85, s.lr_factor(85), s.phase2_fraction(85))
    sparse = s.curve(n_points=5)
    steps = [r[0] for r in sparse]
    assert steps == sorted(set(steps))
    assert {0, 25, 50, 74, 99} <= set(steps)  # evenly spaced (24.75 and 74.25 rounded)
    assert {9, 10, 79, 80, 90} <= set(steps)  # warmup end, phase boundary, re-warm peak
    assert all(lr == s.lr_factor(i) and f == s.phase2_fraction(i) for i, lr, f in sparse)
    with pytest.raises(ValueError, match="n_points"):
        s.curve(n_points=1)


@pytest.mark.parametrize("kwargs", [dict(name="cosine", warmup_steps=10), dict(name="wsd", warmup_steps=5),
                                    dict(TWO_PHASE, decay_shape="cosine")])
def test_lambda_lr_drives_a_torch_optimizer(kwargs):
    peak = 3e-3
    s = schedule(**kwargs)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=peak)
    scheduler = s.lambda_lr(optimizer)
    seen = []
    for step in range(100):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
        if step == 84:
            saved = scheduler.state_dict()
    assert seen == approx([peak * s.lr_factor(i) for i in range(100)], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] == approx(peak * s.lr_factor(99))  # stepped past the end: held
    # resuming from a checkpoint continues at the same LR
    optimizer2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=peak)
    scheduler2 = s.lambda_lr(optimizer2)
    scheduler2.load_state_dict(saved)
    assert scheduler2.get_last_lr()[0] == approx(peak * s.lr_factor(85))


@pytest.mark.parametrize(("total", "kwargs", "field"), [
    (100, dict(name="linrar"), "name"),
    (100, dict(name="exp", min_lr_ratio=0.0), "min_lr_ratio"),
    (100, dict(name="step", step_drops=0), "step_drops"),
    (10, dict(name="step", warmup_steps=8, step_drops=2), "step_drops"),
    (100, dict(decay_shape="step"), "decay_shape"),
    (100, dict(phase1_shape="linear"), "phase1_shape"),
    (100, dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (100, dict(decay_fraction=-0.1), "decay_fraction"),
    (100, dict(replay_fraction=2.0), "replay_fraction"),
    (100, dict(phase1_min_ratio=math.nan), "phase1_min_ratio"),
    (100, dict(warmup_steps=-1), "warmup_steps"),
    (100, dict(warmup_steps=100), "warmup_steps"),
    (100, dict(rewarm_ratio=-0.5), "rewarm_ratio"),
    (100, dict(phase2_start=-1.0), "phase2_start"),
    (100, dict(name="wsd", warmup_steps=10, decay_fraction=0.95), "decay_fraction"),
    (100, dict(TWO_PHASE, phase2_start=150.0), "phase2_start"),
    (100, dict(TWO_PHASE, phase2_start=0.05), "phase2_start"),
    (100, dict(TWO_PHASE, phase2_start=0.0, warmup_steps=0), "phase2_start"),
    (100, dict(TWO_PHASE, phase2_start=0.999), "phase2_start"),
    (100, dict(TWO_PHASE, rewarm_steps=19), "rewarm_steps"),
    (100, dict(TWO_PHASE, rewarm_ratio=0.01), "rewarm_ratio"),
    (100, dict(TWO_PHASE, decay_shape="exp", min_lr_ratio=0.0), "min_lr_ratio"),
    (0, dict(), "total_steps"),
])
def test_invalid_configs_name_the_field(total, kwargs, field):
    with pytest.raises(ConfigError, match=field) as err:
        schedule(total=total, **kwargs)
    assert "\n" not in str(err.value)


def test_limits_are_inclusive():
    schedule(**{**TWO_PHASE, "rewarm_steps": 18})  # leaves one anneal step
    schedule(name="cosine", warmup_steps=99)
    schedule(name="wsd", warmup_steps=80, decay_fraction=0.2)
    with pytest.raises(ConfigError, match="tokens_per_step"):
        schedule(tokens_per_step=0)
    with pytest.raises(ConfigError, match="valid: cosine, wsd, constant, linear, step, exp, two_phase"):
        ScheduleConfig(name="cosin")


@st.composite
def valid_schedules(draw):
    """Valid by construction (two-phase included), so that few examples are rejected."""
    name = draw(st.sampled_from(SCHEDULES))
    total = draw(st.integers(3 if name == "two_phase" else 1, 300))
    tokens_per_step = draw(st.integers(1, 4096))
    min_lr = draw(st.floats(0.0, 1.0))
    shape = draw(st.sampled_from(DECAY_SHAPES))
    if (shape == "exp" or name == "exp") and min_lr == 0:
        min_lr = 0.01
    phase2_step = draw(st.integers(1, total - 1)) if name == "two_phase" else total - 1
    phase2_start = draw(st.sampled_from([phase2_step / total, float(phase2_step * tokens_per_step)]))
    warmup = draw(st.integers(0, phase2_step if name == "two_phase" else total - 1))
    decay_fraction = draw(st.floats(0.0, (total - warmup) / total))
    config = ScheduleConfig(
        name=name, warmup_steps=warmup, min_lr_ratio=min_lr, decay_fraction=decay_fraction, decay_shape=shape,
        phase1_shape=draw(st.sampled_from(["constant", "cosine"])), phase1_min_ratio=draw(st.floats(0.0, 1.0)),
        phase2_start=phase2_start, rewarm_steps=draw(st.integers(0, max(0, total - 2 - phase2_step))),
        rewarm_ratio=draw(st.floats(min_lr, 2.0)), replay_fraction=draw(st.floats(0.0, 1.0)),
        step_drops=draw(st.integers(1, 3)))
    try:
        return build_schedule(config, total, tokens_per_step)
    except ConfigError:  # float rounding at the limits (e.g. decay_fraction a hair too long)
        assume(False)


@settings(max_examples=150, deadline=None)
@given(valid_schedules())
def test_lr_factor_is_finite_and_bounded(s):
    c = s.config
    top = max(1.0, c.rewarm_ratio) if c.name == "two_phase" else 1.0
    for step in range(s.total_steps):
        lr = s.lr_factor(step)
        assert math.isfinite(lr) and 0.0 <= lr <= top * (1 + 1e-12)
        assert s.phase2_fraction(step) in (0.0, 1.0 - c.replay_fraction)
    assert s.lr_factor(s.total_steps - 1) == approx(c.min_lr_ratio) or c.name in ("constant", "wsd")
    if c.name == "two_phase" and c.rewarm_steps > 0:
        p = s.phase2_start_step
        assert s.lr_factor(p) == s.lr_factor(p - 1)  # continuous at the phase boundary


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["min_lr_ratio", "decay_fraction", "phase1_min_ratio", "replay_fraction"]),
       st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9), st.just(math.nan), st.just(math.inf)))
def test_out_of_range_fractions_raise_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ScheduleConfig(**{field: value})


@pytest.mark.parametrize("name", ["linear", "step", "exp"])
def test_shipped_decay_recipes_compose_and_end_at_their_floor(name):
    from hybrids.training.config import compose

    config = compose([f"schedule={name}", "trainer.max_steps=200"]).schedule
    s = build_schedule(config, 200)
    assert config.name == name and config.warmup_steps == 20 and config.min_lr_ratio == 0.1
    assert s.lr_factor(19) == 1.0 and s.lr_factor(199) == approx(0.1)
    assert all(a >= b for a, b in pairwise(s.lr_factor(i) for i in range(20, 200)))
    if name == "step":  # 180 steps after warmup in 3 stages: 1, sqrt(0.1), 0.1
        assert [s.lr_factor(i) for i in (79, 80, 139, 140)] == approx([1.0, 0.1 ** 0.5, 0.1 ** 0.5, 0.1])
