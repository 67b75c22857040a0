"""`python -m pan_jax.main` refuses a bad --config in one line that names what is wrong."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_main(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pan_jax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", **env},  # pan_jax as installed; configs/ from the file
    )


@pytest.mark.parametrize(
    ("file_text", "overrides", "expected"),
    [
        (None, [], "--config={config}: no such file"),
        ("x = 1\n", [], "--config={config}: the file defines no get_config()"),
        ("def get_config(:\n", [], "--config={config}: invalid syntax at {config}:1"),
        (
            "def get_config():\n    return 1 / 0\n",
            [],
            "--config={config}: ZeroDivisionError: division by zero (at {config}:2)",
        ),
        (
            "def get_config():\n    raise ValueError('crop too small')\n",
            [],
            "--config={config}: ValueError: crop too small (at {config}:2)",
        ),
        (
            "from configs import demo\n\ndef get_config():\n    return demo.get_config()\n",
            ["--config.trian_steps=3"],
            "--config.trian_steps: the config has no field 'trian_steps'; "
            "did you mean 'num_train_steps'?",
        ),
        (
            "from configs import demo\n\ndef get_config():\n    return demo.get_config()\n",
            ["--config.seed=1", "--config.model.widht=3"],
            "--config.model.widht: the config has no field 'widht'",
        ),
        (  # the field exists elsewhere: the last override naming it was blamed
            "from configs import demo\n\ndef get_config():\n    return demo.get_config()\n",
            ["--config.model.crop_size=3", "--config.data.crop_size=64"],
            "--config.model.crop_size: the config has no field 'crop_size'",
        ),
        (  # an AttributeError about get_config raised inside the file's own get_config
            "import types\n\ndef get_config():\n    return types.SimpleNamespace().get_config()\n",
            [],
            "--config={config}: AttributeError: 'types.SimpleNamespace' object has no attribute "
            "'get_config' (at {config}:4)",
        ),
        (  # a misspelt field inside the file: ConfigDict's quoted, escaped KeyError text
            "from configs import demo\n\ndef get_config():\n    c = demo.get_config()\n"
            "    return c.modle\n",
            [],
            "--config={config}: the config has no field 'modle'; did you mean 'model'? "
            "(at {config}:5)",
        ),
        (
            "def get_config():\n    return open('/no/such/list.txt')\n",
            [],
            "--config={config}: FileNotFoundError: [Errno 2] No such file or directory: "
            "'/no/such/list.txt' (at {config}:2)",
        ),
        (
            "def get_config():\n    return None\n",
            ["--config.seed=1"],
            "flag --config={config}: get_config() returned NoneType, expected a ConfigDict",
        ),
        (
            "def get_config():\n    return 1\n",
            [],
            "flag --config={config}: get_config() returned int, expected a ConfigDict",
        ),
        (  # an error type that ml_collections cannot re-raise with its traceback text
            "import json\n\ndef get_config():\n    return json.loads('{bad')\n",
            [],
            "--config={config}: JSONDecodeError: Expecting property name enclosed in double "
            "quotes: line 1 column 2 (char 1) (at {config}:4)",
        ),
        (  # raised while the file handled a KeyError of its own: not caused by it
            "import os\nfrom configs import demo\n\ndef get_config():\n    c = demo.get_config()\n"
            "    try:\n        os.environ['PAN_JAX_NO_SUCH_VARIABLE']\n    except KeyError:\n"
            "        c.seed.real.nope\n    return c\n",
            [],
            "--config={config}: AttributeError: 'int' object has no attribute 'nope' "
            "(at {config}:9)",
        ),
        (  # an error in the file, with a valid override that names the same field
            "from configs import demo\n\ndef get_config():\n    c = demo.get_config()\n"
            "    c.eval.crop_size = c.stride\n    return c\n",
            ["--config.eval.stride=256"],
            "--config={config}: the config has no field 'stride' (at {config}:5)",
        ),
        (  # a misspelt field set in the file: it was a new field nothing read (batch 8 ran)
            "from configs import demo\n\ndef get_config():\n    c = demo.get_config()\n"
            "    c.batch_sze = 4\n    return c\n",
            [],
            "--config={config}: the config has no field 'batch_sze'; did you mean 'batch_size'? "
            "(at {config}:5)",
        ),
        (  # the same in a section the file replaced (config.data)
            "from configs import demo\nfrom pan_jax.data import pipeline\n\ndef get_config():\n"
            "    c = demo.get_config()\n    c.data = pipeline.default_data_config('voc_aug')\n"
            "    c.data.crop_sise = 64\n    return c\n",
            [],
            "--config={config}: the config has no field 'crop_sise'; did you mean 'crop_size'? "
            "(at {config}:7)",
        ),
        (  # raised in a helper of the file: named where it was raised, not where it was called
            "def helper():\n    return 1 / 0\n\n\ndef get_config():\n    return helper()\n",
            [],
            "--config={config}: ZeroDivisionError: division by zero (at {config}:2)",
        ),
        (  # get_config missing from another module the file calls: the file defines its own
            "import string\n\n\ndef get_config():\n    return string.get_config()\n",
            [],
            "--config={config}: AttributeError: module 'string' has no attribute 'get_config' "
            "(at {config}:5)",
        ),
        (  # the misspelt field is not the override's last part
            "from configs import demo\n\ndef get_config():\n    return demo.get_config()\n",
            ["--config.modle.backbone=resnet50"],
            "--config.modle.backbone: the config has no field 'modle'; did you mean 'model'?",
        ),
        (
            "def get_config():\n    raise ValueError('crop too small\\nexpected >= 512')\n",
            [],
            "--config={config}: ValueError: crop too small expected >= 512 (at {config}:2)",
        ),
    ],
)
def test_bad_config_is_one_line_naming_it(tmp_path, file_text, overrides, expected):
    config = tmp_path / "my_config.py"
    if file_text is not None:
        config.write_text(file_text)
    result = run_main(f"--config={config}", f"--workdir={tmp_path / 'run'}", *overrides)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert fatal == [f"FATAL Flags parsing error: {expected.format(config=config)}"], result.stderr
    assert not (tmp_path / "run").exists()


def test_config_arguments_and_bad_override_values_are_one_line(tmp_path):
    """A get_config argument it does not take, and a value of the wrong type (absl's words)."""
    result = run_main("--config=configs/demo.py:foo", f"--workdir={tmp_path}")
    assert "Traceback" not in result.stderr and result.returncode == 1
    assert (
        "FATAL Flags parsing error: --config=configs/demo.py:foo: TypeError: get_config() takes 0 "
        "positional arguments but 1 was given"
    ) in result.stderr
    result = run_main("--config", "configs/demo.py", "--config.num_train_steps=abc")
    assert "Traceback" not in result.stderr and result.returncode == 1
    assert "--config.num_train_steps=abc: invalid literal for int()" in result.stderr


def test_a_workdir_that_is_a_file_or_holds_no_checkpoint_is_one_line(tmp_path):
    """Checked before anything is written; run from another directory than the repository's
    (config files import their siblings from any directory)."""
    config = f"--config={REPO / 'configs' / 'demo.py'}"
    workdir = tmp_path / "notes.txt"
    workdir.write_text("mine")
    result = run_main(config, f"--workdir={workdir}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: --workdir={workdir} is a file: expected a directory" in result.stderr
    assert workdir.read_text() == "mine"
    below = workdir / "run"  # training would fail to make it, after building its dataset
    result = run_main(config, f"--workdir={below}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: --workdir={below}: {workdir} is a file, not a directory" in result.stderr
    assert workdir.read_text() == "mine"

    empty = tmp_path / "run"
    empty.mkdir()
    result = run_main(config, f"--workdir={empty}", "--mode=eval", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {empty} is neither a pan_jax model directory" in result.stderr
    assert not list(empty.iterdir())  # no compilation cache or log left in it
    # A shell leaves `~` in --workdir=~/run: it is the home folder's, not ./~/run.
    result = run_main(config, "--workdir=~/run", "--mode=eval", cwd=tmp_path, HOME=str(tmp_path))
    assert f"error: {empty} is neither a pan_jax model directory" in result.stderr


def test_config_given_in_a_flagfile_is_named(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("def get_config(:\n")
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(f"--config={config}\n--workdir={tmp_path / 'run'}\n")
    result = run_main(f"--flagfile={flagfile}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"--config={config}: invalid syntax at {config}:1" in result.stderr
    # A good config from a flag file imports its siblings from another directory too.
    flagfile.write_text(f"--config={REPO / 'configs' / 'demo.py'}\n--config.trian_steps=3\n")
    result = run_main(f"--flagfile={flagfile}", cwd=tmp_path)
    assert "--config.trian_steps: the config has no field 'trian_steps'" in result.stderr


def test_the_config_named_is_the_one_that_failed(tmp_path):
    """absl loads every --config given, the last one wins; the report names the failing one."""
    bad = tmp_path / "boom.py"
    bad.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    good = REPO / "configs" / "demo.py"
    result = run_main(f"--config={good}", f"--config={bad}", cwd=tmp_path)
    assert f"--config={bad}: RuntimeError: boom (at {bad}:2)" in result.stderr, result.stderr
    result = run_main(f"--config={tmp_path}", cwd=tmp_path)
    assert f"--config={tmp_path}: not a file" in result.stderr


def test_a_missing_flagfile_is_one_line(tmp_path):
    result = run_main(f"--flagfile={tmp_path / 'none.txt'}", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Unable to open flagfile" in result.stderr and "none.txt" in result.stderr


def test_the_configs_parent_is_on_sys_path_only_while_it_loads(tmp_path):
    """A module beside the configs folder must not shadow an installed one afterwards."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("")
    (tmp_path / "configs" / "mine.py").write_text(
        "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n"
    )
    (tmp_path / "jax.py").write_text("raise ImportError('the wrong jax')\n")
    empty = tmp_path / "run"
    empty.mkdir()
    config = f"--config={tmp_path / 'configs' / 'mine.py'}"
    result = run_main(config, f"--workdir={empty}", "--mode=eval", cwd=REPO)
    assert "the wrong jax" not in result.stderr, result.stderr
    assert f"error: {empty} is neither a pan_jax model directory" in result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "--config.model.backbone=resnet19",
            "error: config.model: unknown backbone 'resnet19'; known backbones: resnet18,",
        ),
        (
            "--config.model.overrides.fpa_pooling=mean",
            "error: config.model: option fpa_pooling='mean': expected one of 'avg', 'max'",
        ),
        ("--config.data.name=pan_synth", "error: data.name='pan_synth': expected 'voc_aug',"),
        ("--config.eval.mode=tiles", "error: config.eval.mode='tiles': expected one of"),
        ("--config.batch_size=0", "error: config.batch_size=0 and config.grad_accum_steps=1:"),
        (  # weights out of reach (offline): what to copy where, not three chained tracebacks
            "--config.model.pretrained=http://127.0.0.1:9/resnet18.safetensors",
            "error: cannot download http://127.0.0.1:9/resnet18.safetensors from",
        ),
        (  # these two were tracebacks
            "--config.model.pretrained=/nowhere/resnet18.safetensors",
            "error: config.model.pretrained='/nowhere/resnet18.safetensors' (pretrained_kind="
            "'timm'): pretrained weights /nowhere/resnet18.safetensors not found (timm)",
        ),
        ("--config.data.num_classes=5", "error: data.num_classes=5, but pan_synthetic has 13"),
        ("--config.warmup_steps=-5", "error: config.warmup_steps=-5: expected >= 0"),  # was taken
        ("--config.momentum=1.5", "error: config.momentum=1.5: expected in [0, 1)"),
        (  # named no field
            "--config.eval.scales=1.0,abc",
            "error: config.eval.scales=('1.0,abc',): expected a tuple of positive scale factors",
        ),
    ],
)
def test_a_config_value_a_run_cannot_use_is_one_line(tmp_path, override, expected):
    workdir = tmp_path / "run"
    config = f"--config={REPO / 'configs' / 'demo.py'}"
    cache = str(tmp_path / "cache")  # where weights would be downloaded to
    result = run_main(config, f"--workdir={workdir}", override, PAN_JAX_CACHE_DIR=cache)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(expected), result.stderr
    assert not (workdir / "checkpoints").exists()


def test_help_says_how_to_set_config_fields():
    result = run_main("--help")  # absl's --help exits 1
    assert "Any field of the config can be set on the command line" in result.stdout
    assert "--config.batch_size=8" in result.stdout and "--mode: <train|eval>" in result.stdout


def test_eval_of_a_step_or_a_model_the_workdir_lacks_is_one_line_and_deletes_nothing(tmp_path):
    """--mode=eval on a run's workdir: a --step it has no checkpoint of, or the config of another
    model, exits 1 naming the workdir and what differs; the checkpoints stay."""
    import optax

    from configs import demo
    from pan_jax import checkpointing, models, train

    config = demo.get_config()
    spec = train.model_spec(config)
    workdir = tmp_path / "run"
    manager = checkpointing.create_manager(workdir, config)
    variables = models.random_variables(train.create_model(config, spec))
    state = train.state_from_variables(variables, optax.sgd(0.1))
    checkpointing.save(manager, 1, state.replace(step=1), spec, force=True)
    manager.wait_until_finished()
    manager.close()
    files = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    demo_config = f"--config={REPO / 'configs' / 'demo.py'}"

    result = run_main(demo_config, f"--workdir={workdir}", "--mode=eval", "--step=7")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {workdir / 'checkpoints'} has no step 7; it has [1]"
    )
    other = "--config.model.backbone=resnet34"
    result = run_main(demo_config, f"--workdir={workdir}", "--mode=eval", other)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: checkpoint 1 in {workdir} was written for another model:" in result.stderr
    assert result.stderr.strip().splitlines()[-1].strip() == (
        "backbone: checkpoint 'resnet18', config 'resnet34'"
    )
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == files


def test_an_argument_that_is_no_flag_is_refused(tmp_path):
    # `--mode eval` or a stray word: absl leaves it unparsed, and the run must not train.
    config = f"--config={REPO / 'configs' / 'demo.py'}"
    result = run_main(config, f"--workdir={tmp_path / 'run'}", "eval")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "unexpected arguments: ['eval']" in result.stderr
    assert not (tmp_path / "run").exists()


def run_main_script(tmp_path, source: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `source`, a script that drives pan_jax.main with stand-ins, in a process of its own
    (main's flags and the stand-ins stay out of this one)."""
    script = tmp_path / "run_main.py"
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )


CAUGHT_ERRORS_SCRIPT = """
import sys

from pan_jax import checkpointing, config_errors, evaluate, main, sharding, train
from pan_jax.convert.core import ConversionError
from pan_jax.convert.download import DownloadError
from pan_jax.data.pipeline import CorruptRecordError
from pan_jax.data.voc_aug import VocAugError

main._parse_flags(["main", *sys.argv[1:]])
errors = [
    config_errors.ConfigError, DownloadError, ConversionError,
    checkpointing.CheckpointMismatchError, checkpointing.CheckpointDamagedError,
    checkpointing.WorkdirInUseError, CorruptRecordError, VocAugError,
    train.NonFiniteLossError, sharding.OtherProcessError, evaluate.ReportWriteError,
]
for error in errors:
    def train_and_evaluate(config, workdir, error=error):
        raise error(f"the {error.__name__}")
    train.train_and_evaluate = train_and_evaluate
    try:
        main.main(["main"])
    except SystemExit as exit:
        print(exit.code)
"""


def test_a_run_that_fails_as_expected_ends_in_one_error_line(tmp_path):
    """What a run can meet (a bad value, weights out of reach, a damaged checkpoint or record, a
    workdir in use, a diverged loss, another process's failure) ends in `error: <what>` and
    exit status 1, not a traceback; launchers and users read that last line."""
    config, workdir = f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={tmp_path / 'run'}"
    result = run_main_script(tmp_path, CAUGHT_ERRORS_SCRIPT, config, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"error: the {name}"
        for name in (
            "ConfigError",
            "DownloadError",
            "ConversionError",
            "CheckpointMismatchError",
            "CheckpointDamagedError",
            "WorkdirInUseError",
            "CorruptRecordError",
            "VocAugError",
            "NonFiniteLossError",
            "OtherProcessError",
            "ReportWriteError",
        )
    ]


DISPATCH_SCRIPT = """
import sys

from pan_jax import evaluate, main, train

main._parse_flags(["main", *sys.argv[1:]])
train.train_and_evaluate = lambda config, workdir: print("train", workdir)
evaluate.evaluate = lambda config, workdir, step=None: print("eval", workdir, step)
for mode, step in (("train", None), ("eval", 3), ("eval", None)):
    main.FLAGS.mode, main.FLAGS.step = mode, step
    main.main(["main"])
"""


def test_each_mode_runs_its_job_on_the_workdir_and_step_given(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)  # a finished step, as main checks
    (workdir / "checkpoints" / "5").mkdir()
    config = f"--config={REPO / 'configs' / 'demo.py'}"
    result = run_main_script(tmp_path, DISPATCH_SCRIPT, config, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"train {workdir}",
        f"eval {workdir} 3",  # --step: that checkpoint, not the latest
        f"eval {workdir} None",
    ]


def test_a_step_given_to_a_training_run_is_refused(tmp_path):
    # --step picks the checkpoint --mode=eval scores; a training run always resumes from the
    # latest one, so a --step there would be ignored while the user thinks it resumes there.
    config = f"--config={REPO / 'configs' / 'demo.py'}"
    result = run_main(config, f"--workdir={tmp_path / 'run'}", "--step=5")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --step=5 is for --mode=eval: training resumes from the workdir's latest checkpoint"
    )
    assert not (tmp_path / "run").exists()
