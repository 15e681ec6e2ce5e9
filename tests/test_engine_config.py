"""The run config rejects wrongly typed, non-finite and out-of-range values naming the key: examples and a fuzz test."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import typing

import pytest

from training.engine.config import OptimSection, RunSection, TrainConfig

# The spec, written independently of the code: key -> (kind, low, high, low_open, high_open); None: unbounded.
NUMBERS = {
    "lora.rank": ("int", 1, 1024, False, False),
    "lora.alpha": ("float?", 0, None, True, False),
    "lora.dropout": ("float", 0, 1, False, True),
    "data.resolution": ("int16", 16, 8192, False, False),
    "data.caption_tokens": ("int", 1, 8192, False, False),
    "data.num_workers": ("int", 0, 256, False, False),
    "data.shuffle_buffer": ("int", 1, 10_000_000, False, False),
    "data.caption_dropout": ("float", 0, 1, False, False),
    "optim.lr": ("float", 0, 1, True, False),  # 1 allowed: Prodigy's usual lr
    "optim.weight_decay": ("float", 0, None, False, False),
    "optim.eps": ("float", 0, 1, True, True),
    "optim.warmup_steps": ("int", 0, 10_000_000, False, False),
    "optim.grad_clip": ("float", 0, None, False, False),
    "objective.shift": ("float", 0, None, True, False),
    "objective.logit_mean": ("float", None, None, False, False),
    "objective.logit_std": ("float", 0, None, True, False),
    "run.steps": ("int", 1, 10_000_000, False, False),
    "run.micro_batch": ("int", 1, 4096, False, False),
    "run.grad_accum": ("int", 1, 4096, False, False),
    "run.checkpoint_depth": ("int", 0, 1024, False, False),
    "run.save_every": ("int?", 0, 10_000_000, False, False),
    "run.seed": ("int", 0, 2**32 - 1, False, False),
    "run.nccl_timeout_s": ("int", 1, None, False, False),
}
# run.fsdp_cpu_offload is left out: it is valid only with mode 'full' (a cross-field rule, tested with the engine)
BOOLS = ("data.synthetic", "run.compile", "run.save_state", "run.resume", "run.ddp_bf16_grads")
CHOICES = {
    "mode": ("lora", "full"),  # qlora needs bitsandbytes at run time only; the config accepts it too
    "model.dtype": ("bf16", "fp32"),
    "lora.targets": ("attention", "attention+ffn", "attention+ffn+refiners", "all"),
    "optim.optimizer": ("adamw", "adamw8bit"),
    "optim.schedule": ("constant", "cosine"),
    "objective.sigma_sampler": ("shifted_uniform", "logit_normal", "uniform"),
}
ODD_VALUES = [True, False, None, "1", "", [], [1], {}, {"a": 1}, math.nan, math.inf, -math.inf, 1e308, -1e308]


def base_config() -> dict:
    return {"run": {"output_dir": "/tmp/whetstone-config-test"}, "data": {"synthetic": True, "shards": "shards"}}


def with_value(key: str, value) -> dict:
    config = base_config()
    section, _, name = key.rpartition(".")
    (config.setdefault(section, {}) if section else config)[name] = value
    return config


def expected_ok(key: str, value) -> bool:
    if key in BOOLS:
        return isinstance(value, bool)
    if key in CHOICES:
        return value in CHOICES[key]
    kind, low, high, low_open, high_open = NUMBERS[key]
    if kind.endswith("?") and value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind.startswith("int") and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if kind == "int16" and value % 16:
        return False
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def candidates(key: str, rng: random.Random) -> list:
    values = list(ODD_VALUES)
    if key in CHOICES:
        return values + list(CHOICES[key]) + [CHOICES[key][0].upper(), CHOICES[key][0] + " "]
    if key in BOOLS:
        return values + [0, 1]
    _, low, high, _, _ = NUMBERS[key]
    for edge in (low, high):
        if edge is not None:
            values += [edge, edge - 1, edge + 1, edge - 1e-9, edge + 1e-9, float(edge), edge + 0.5]
    lo, hi = (low if low is not None else -1e6), (high if high is not None else 1e6)
    values += [rng.randint(int(lo), int(hi)) for _ in range(12)] + [rng.uniform(lo, hi) for _ in range(12)]
    return values


def test_fuzz_each_key_accepts_exactly_its_spec():
    """Property over ~1,300 (key, value) pairs, fixed seed: accepted iff the spec says so; a refusal is a ValueError
    whose message starts with the key; an accepted config survives a JSON round trip unchanged."""
    rng = random.Random(20261201)
    keys = [*NUMBERS, *BOOLS, *CHOICES]
    checked = 0
    for key in keys:
        for value in candidates(key, rng):
            config = with_value(key, value)
            try:
                parsed = TrainConfig.from_dict(config)
            except ValueError as error:
                assert not expected_ok(key, value), f"{key}={value!r} refused: {error}"
                assert str(error).startswith(f"{key}: ") or str(error).startswith(f"{key} "), (key, value, str(error))
            else:
                assert expected_ok(key, value), f"{key}={value!r} accepted"
                again = TrainConfig.from_dict(json.loads(json.dumps(parsed.to_dict())))
                assert again.to_dict() == parsed.to_dict()
            checked += 1
    assert checked > 1000


def test_fuzz_random_whole_configs_never_raise_anything_but_value_error():
    """Whole configs with several keys mutated at once: only ValueError (never TypeError or a crash)."""
    rng = random.Random(7)
    keys = [*NUMBERS, *BOOLS, *CHOICES]
    accepted = 0
    for _ in range(400):
        config = base_config()
        for key in rng.sample(keys, 4):
            value = rng.choice(candidates(key, rng))
            section, _, name = key.rpartition(".")
            (config.setdefault(section, {}) if section else config)[name] = value
        try:
            TrainConfig.from_dict(config)
            accepted += 1
        except ValueError:
            pass
    assert 0 < accepted < 400


def test_every_float_field_refuses_nan_and_inf_naming_the_key():
    """Generic over the dataclasses: a float field added later is covered too."""
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    found = []
    for section in sections:
        kind = hints[section]
        kind = next((k for k in typing.get_args(kind) or (kind,) if dataclasses.is_dataclass(k)), None)
        if kind is None:
            continue
        for name, hint in typing.get_type_hints(kind).items():
            if hint not in (float, float | None):
                continue
            found.append(f"{section}.{name}")
            for bad in (math.nan, math.inf, -math.inf):
                with pytest.raises(ValueError, match=rf"^{section}\.{name}: must be a finite number"):
                    TrainConfig.from_dict(with_value(f"{section}.{name}", bad))
    assert {"optim.weight_decay", "optim.eps", "objective.shift", "lora.alpha"} <= set(found), found


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_decay": math.inf}, "optim.weight_decay: must be a finite number >= 0, got inf"),
        ({"eps": 0}, "optim.eps: must be a finite number in (0, 1), got 0"),
        ({"betas": (0.9, math.nan)}, "optim.betas[1]: must be a finite number in [0, 1), got nan"),
        ({"betas": (0.9,)}, "optim.betas: must be a list of 2 values"),
    ],
)
def test_optim_examples(kwargs, message):
    with pytest.raises(ValueError) as error:
        OptimSection(**kwargs)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("steps", [True, 1.5, "10", 0])
def test_steps_must_be_a_plain_integer(steps):
    with pytest.raises(ValueError, match=r"^run.steps: must be an integer in 1\.\.10,000,000, got"):
        RunSection(output_dir="x", steps=steps)


def test_shift_inf_is_refused_through_a_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"run": {"output_dir": "x"}, "objective": {"shift": Infinity}}')
    with pytest.raises(ValueError, match=r"config\.json: objective\.shift: must be a finite number > 0, got inf"):
        TrainConfig.load(path)


def test_integers_where_floats_go_become_floats():
    config = TrainConfig.from_dict({"run": {"output_dir": "x"}, "optim": {"weight_decay": 0, "grad_clip": 2}})
    assert type(config.optim.weight_decay) is float and type(config.optim.grad_clip) is float
    assert config.optim.grad_clip == 2.0


@pytest.mark.parametrize(
    ("steps", "save_every", "interval"),
    [(40, None, 0), (100, None, 50), (1000, None, 100), (5000, None, 500), (1_000_000, None, 1000), (1000, 0, 0)],
)
def test_save_interval_defaults_to_a_tenth_of_the_run(steps, save_every, interval):
    assert RunSection(output_dir="x", steps=steps, save_every=save_every).save_interval()[0] == interval
