import json
import os
import shutil
from pathlib import Path

# Before torch loads, here and in every process a test starts: OpenMP threads that spin while they wait for work
# take the cores from the other processes of a test (a run and its workers, the test itself, the other xdist
# worker); sleeping threads give them back. Numbers are unchanged. On the 2-core machine with other work on it,
# 300 forwards of the tiny model took 9 s spinning and 0.5 s passive (two such loops side by side: 55 s and 1.2 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One OpenMP thread per process: the suite runs one process per core already (xdist), and the tiny models' ops
# are too small to split — test_fast_families took 46 s with two threads, 33 s with one, on an idle machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from extractor.cli.main import cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
# Tests run random tiny models, whose every record is truncated or invalid: such a run exits 1 unless told to
# accept it (tests/test_attack_files.py tests that exit without this variable).
os.environ.setdefault("EXTRACTOR_ALLOW_NO_RESULT", "1")
SESSION_ENV = dict(os.environ)  # as the session starts: what warm-started commands run in (a test may patch its own)


def shared_path(*parts) -> Path:
    """A file under ../shared/, or skip the test cleanly when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# `make test` runs the suite on both cores (pytest-xdist, --dist loadgroup). The longest tests start first, so
# that no worker is left with one of them at the end while the other idles; seconds of a test (or of a whole
# module) from a serial run on the 2-core machine, summed over a group. A name missing here (renamed, new) only
# loses its place at the front.
SLOW_FIRST = {
    "test_ray_cluster.py": 55, "test_ray.py": 27,
    "test_reliability.py::test_run_survives_20_kills": 46, "test_reliability.py::test_shard_merge_survives_kills": 32,
    "test_reliability.py::test_train_resume_after_kills_matches_uninterrupted": 11,
    "test_multi_adapter_run.py::test_sigkill_then_resume_every_output_exactly_once": 10,
    "test_multi_adapter_run.py::test_ctrl_c_stops_every_output_and_resume_finishes_them": 9,
    "test_fast_families.py": 34,
    "test_lora_mixed.py::test_mixed_lora_compiled_compiles_once_for_every_layer": 10,
    "test_attack_models.py::test_50mb_record_is_found_long_in_bounded_time_and_memory": 21,
    "test_startup.py::test_regional_compile_compiles_one_layer_for_all": 6,
    "test_compare_calibration.py::test_equal_runs_fail_the_gate_at_alpha_over_all_jd_fields": 17,
    "test_compare_calibration.py::test_a_trend_of_equal_checkpoints_is_one_family": 10,
    "test_compare_calibration.py::test_equal_runs_fail_the_gate_at_most_alpha_over_spo_predicates": 9,
    "test_shards.py::test_merge_interrupted_before_its_manifest_finishes_on_resume": 12,
    "test_fuzz_outputs.py::test_any_output_is_written_read_back_and_counted": 12,
    "test_shards.py::test_two_workers_equal_single_process": 20,
    "test_shards.py::test_dead_worker_is_reported_and_resumable": 19,
    "test_bench_scripts.py::test_fast_on_off_smoke": 15, "test_bench_scripts.py::test_cli_smoke": 10,
    "test_storage.py::test_killed_runs_resume_exactly_once_on_the_store": 14,
}
# Tests that must not run beside each other: one Ray at a time (a two-node cluster and a local instance would
# share the cores and, through ray's default address file, possibly each other).
EXCLUSIVE = {"test_ray_cluster.py": "ray", "test_ray.py": "ray"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Group and order the tests for xdist: the tests of a module that share a module-scoped fixture run on one
    worker (it is built once), exclusive ones share a group, and the costliest groups start first. Serial runs get
    the same order; every test still runs, with its fixtures, as written."""
    def group(item) -> str | None:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        if module in EXCLUSIVE:
            return EXCLUSIVE[module]
        defs = getattr(item, "_fixtureinfo", None)
        scoped = defs and any(d.scope == "module" for fixdefs in defs.name2fixturedefs.values() for d in fixdefs)
        return module if scoped else None

    def timed(item) -> set[str]:
        """SLOW_FIRST's keys naming this test (itself or its module)."""
        name = item.nodeid.split("[")[0].rsplit("/", 1)[-1]
        return {key for key in SLOW_FIRST if name == key or name.startswith(key + "::")}

    units: dict[str, list] = {}  # unit (group or test) -> its items, in collection order
    names = {}
    for item in items:
        names[item] = group(item)
        if names[item]:
            item.add_marker(pytest.mark.xdist_group(names[item]))
        units.setdefault(names[item] or item.nodeid, []).append(item)
    # a unit's seconds: its tests' and modules', each module counted once
    weight = {unit: sum(SLOW_FIRST[key] for key in set().union(*map(timed, members)))
              for unit, members in units.items()}
    ordered = sorted(units, key=lambda unit: -weight[unit])  # stable: the rest keep their collection order
    items[:] = [item for unit in ordered for item in units[unit]]
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        for item in items:
            _name_group_in_nodeid(item, names[item])


def _name_group_in_nodeid(item, name: str | None) -> None:
    """xdist's loadgroup scheduler reads a test's group from its nodeid ("...::test@group"). pytest-xdist 3.8
    writes that suffix into an attribute pytest 9.2's structured node ids no longer read (pytest-xdist issue
    1386), so every test was scheduled on its own: module fixtures were built on both workers, and the two Ray
    modules ran side by side. Written here into the structured id; nothing where the suffix is already there
    (an xdist that writes it, an older pytest)."""
    if name and hasattr(item, "_id") and not item.nodeid.endswith("@" + name):
        item._id = type(item._id).parse(f"{item.nodeid}@{name}")


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    def _run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return _run


@pytest.fixture
def user_tasks(tmp_path):
    """A tasks dir holding a copy of the bundled jd_requirements task, to edit in a test."""
    root = tmp_path / "tasks"
    (root / "prompts").mkdir(parents=True)
    (root / "schemas").mkdir()
    shutil.copy(REPO / "prompts" / "jd_requirements.yaml", root / "prompts" / "mytask.yaml")
    shutil.copy(REPO / "schemas" / "jd_requirements.json", root / "schemas" / "mytask.json")
    spec = root / "prompts" / "mytask.yaml"
    spec.write_text(spec.read_text(encoding="utf-8").replace("name: jd_requirements", "name: mytask")
                    .replace("schema: jd_requirements.json", "schema: mytask.json"), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Qwen2 model with a locally trained tokenizer and chat template."""
    from extractor.datasets.tiny_models import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_raw_model(tmp_path_factory):
    """The same kind of model without a chat template: prompts use the seed's raw format."""
    from extractor.datasets.tiny_models import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny_raw", chat_template=False, seed=1)


def make_adapter(model_dir, kind: str, out, seed: int = 0):
    """Train a peft adapter of `kind` for one step (large lr, so outputs change) and save it."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = {
        "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        "ptuning": lambda: PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32, task_type="CAUSAL_LM"),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }[kind]()
    peft_model = get_peft_model(model, config)
    batch = tok(["本科，java" + '{"学历要求": ["本科"]}'], return_tensors="pt")
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=5.0)
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    opt.step()
    peft_model.save_pretrained(out)
    return out


def synth_corpus(tmp_path, n=24, seed=0, lang="zh"):
    from extractor.datasets.synth import write_corpus
    corpus, gold = tmp_path / f"corpus{seed}.jsonl", tmp_path / f"gold{seed}.jsonl"
    write_corpus(corpus, gold, n, seed=seed, lang=lang)
    return corpus, gold


@pytest.fixture(scope="session")
def warm():
    """A warm-start server (bench/prestart.py) for the tests that start many `extractor` commands, the kill tests:
    each command is forked after the imports, a process of its own in a group of its own; one at a time."""
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    import prestart
    with prestart.Server(prestart.TRAIN, env=SESSION_ENV) as server:
        yield server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on loopback, with authentication on; one per session."""
    from tests.s3server import S3Server
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The server's endpoint and credentials in this process's environment, as a user would export them."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3
