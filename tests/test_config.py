import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_python

import massrl
from massrl.cli import COMMANDS, main
from massrl.config import PACKAGE_CONFIGS, ConfigError, RunConfig, build_config


def test_defaults_validate_and_overrides_apply():
    cfg = build_config(overrides=["optimizer.lr=0.5", "data.subset=2000",
                                  "augment.strategies=[simclr,randaugment]"])
    assert cfg.optimizer.lr == 0.5
    assert cfg.data.subset == 2000
    assert cfg.augment.strategies == ["simclr", "randaugment"]


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lrr=1", "unknown key 'optimizer.lrr'. Did you mean 'optimizer.lr'?"),
    ("optimizr.lr=1", "unknown key 'optimizr'. Did you mean 'optimizer'?"),
    ("augment.view_mod=random", "Did you mean 'augment.view_mode'?"),
    ("optimizer.lr=-1", "optimizer.lr: Input should be greater than 0"),
    ("augment.num_views=0", "augment.num_views"),
    ("data.batch_size=abc", "data.batch_size"),
    ("augment.strategies=[simclr,colour]", "augment.strategies.1"),
    ("augment.strategies=simclr,randaugment",
     "a list is written in brackets: augment.strategies=[simclr,randaugment]"),
    ("augment.randaugment.magnitude=11", "must be < num_magnitude_bins=11"),
    ("augment.strategies=[simclr,randaugment,simclr]", "lists simclr more than once"),
    ("trainer.precision=fp8", "trainer.precision: Input should be 'auto', '32-true'"),
    # lax pydantic would read true as 1 (lr 1.0, batch size 1)
    ("optimizer.lr=true", "optimizer.lr: is not a true/false setting"),
    ("data.batch_size=false", "data.batch_size: is not a true/false setting"),
    ("trainer.limit_train_batches=-1", "a number of batches (>= 1) or a fraction in (0, 1]"),
    ("trainer.limit_train_batches=1.5", "a number of batches (>= 1) or a fraction in (0, 1]"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("optimizer.lr=inf", "optimizer.lr: Input should be a finite number"),
    ("optimizer.scale_lr=cubic", "optimizer.scale_lr: is true (linear: lr x global batch / 256)"
     ", sqrt or false"),
    ("name=2021-01-01", "YAML read '2021-01-01' as a date: quote it, e.g. name='\"2021-01-01\"'"),
    ("data.root=/my dir: v1", "YAML read it as a mapping: a colon and a space inside it?"),
    ("name=yes", "name: was read by YAML as true/false: quote a text value"),
    ("name=1.10", "name: Input should be a valid string (YAML read it as a number; quote"),
    ("loss.temperature=.nan", "loss.temperature: Input should be a finite number"),
    # (1/T is inf in float32 below ~1e-38: the run stopped at step 0 naming the lr)
    ("loss.temperature=1e-40", "loss.temperature: Input should be greater than or equal to"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val: Input should be greater"),
    ("seed=4294967296", "seed: Input should be less than 4294967296"),  # numpy's seed range
    ("data.std=[0.2,0,0.2]", "every channel's std must be positive"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[override])
    assert expected in str(err.value)


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        build_config(overrides=["optimizer.lr"])
    with pytest.raises(ConfigError, match=r"a list of KEY=VALUE strings, e.g. \['data.subset=9'\]"):
        build_config(overrides="data.subset=9")


def test_python_forms_of_overrides_and_base():
    """From Python: a mapping of dotted keys, and a base with dotted or nested keys (the
    caller's dict is left as it was)."""
    assert build_config(overrides={"data.subset": 9, "optimizer.lr": 0.5}).data.subset == 9
    base = {"data": {"subset": 7}, "optimizer.lr": 0.25}
    cfg = build_config(base=base, overrides=["data.batch_size=3"])
    assert (cfg.data.subset, cfg.data.batch_size, cfg.optimizer.lr) == (7, 3, 0.25)
    assert base == {"data": {"subset": 7}, "optimizer.lr": 0.25}
    trainer = build_config(overrides=["trainer.limit_train_batches=0.5"]).trainer
    assert trainer.limit_train_batches == 0.5


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        build_config(config_file=f)
    assert "c.yaml" in str(err.value)
    assert "unknown key 'optimizer.learning_rate'. Did you mean 'optimizer.lr'?" in str(err.value)
    # a dotted name as one YAML key was "unknown key 'optimizer.lr'. Did you mean 'optimizer.lr'?"
    f.write_text("optimizer.lr: 0.1\n")
    with pytest.raises(ConfigError, match="In a YAML file write it nested: 'optimizer:' and, "
                                          "indented below, 'lr:'"):
        build_config(config_file=f)


def test_a_key_written_twice_an_empty_file_and_two_config_files(tmp_path, capsys):
    """Nothing in a config is ignored without a word: a YAML key written twice (PyYAML keeps
    the last), an empty file (the schema defaults, not the default run), a second -c."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("method: byol\noptimizer:\n  lr: 0.5\nmethod: simclr\n")
    with pytest.raises(ConfigError, match=r"key 'method' is written twice \(keep one\)"):
        build_config(config_file=twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("optimizer:\n  lr: 0.5\n  lr: 0.4\n")
    with pytest.raises(ConfigError, match=r"nested.yaml.*\n.*line 3") as err:
        build_config(config_file=nested)
    assert "key 'lr' is written twice" in str(err.value)
    # YAML's merge keys may be overridden; an unhashable key is a config error
    merged = tmp_path / "merged.yaml"
    merged.write_text("data: &d {batch_size: 8, name: digits}\n"
                      "eval: {knn_every: 2}\n")
    assert build_config(config_file=merged).data.batch_size == 8
    from massrl.config import load_yaml

    anchors = tmp_path / "anchors.yaml"
    anchors.write_text("base: &b {batch_size: 8}\ndata: {<<: *b, batch_size: 16}\n")
    assert load_yaml(anchors)["data"] == {"batch_size": 16}
    # an anchored mapping with a merge and an override, merged again elsewhere: no false alarm
    again = tmp_path / "again.yaml"
    again.write_text("a:\n  inner: &x\n    <<: {k: 1}\n    k: 2\nb:\n  <<: *x\n")
    assert load_yaml(again) == {"a": {"inner": {"k": 2}}, "b": {"k": 2}}
    unhashable = tmp_path / "unhashable.yaml"
    unhashable.write_text("[a]: 1\n")
    with pytest.raises(ConfigError, match="found unhashable key"):
        load_yaml(unhashable)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert build_config(config_file=empty) == RunConfig()
    assert "empty.yaml sets no key: the schema defaults apply" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "-c", "fashion_mnist/byol", "-c", "fashion_mnist/simclr",
              "--print-config"])
    assert exit_.value.code == 2
    assert "-c given twice: one config file per run" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(PACKAGE_CONFIGS.rglob("*.yaml")), ids=str)
def test_every_shipped_config_is_valid(path):
    cfg = build_config(config_file=path)
    assert cfg.method == path.stem
    assert cfg.data.name == path.parent.name


def test_shipped_configs_cover_datasets_and_methods():
    names = {str(p.relative_to(PACKAGE_CONFIGS))[:-5] for p in PACKAGE_CONFIGS.rglob("*.yaml")}
    for ds in ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "imagenet100"):
        for m in ("massrl", "byol", "simclr"):
            assert f"{ds}/{m}" in names


@pytest.mark.parametrize("path", sorted(PACKAGE_CONFIGS.rglob("simclr.yaml")), ids=str)
def test_shipped_simclr_configs_use_simclrs_own_colour_recipe(path):
    """README: "the SimCLR configs use SimCLR's own". fashion_mnist/simclr had BYOL's jitter
    and, with augment.asymmetric=false, the first view's blur p=1.0 on every view."""
    colour = build_config(config_file=path).augment.simclr
    assert tuple(colour.jitter) == (0.8, 0.8, 0.8, 0.2)
    assert tuple(colour.blur_p) == (0.5, 0.5) and tuple(colour.solarize_p) == (0.0, 0.0)


def test_a_config_files_dataset_settings_stay_with_its_dataset(capsys):
    """fashion_mnist/massrl's 20,000-image subset and bank must not cut a folder of images."""
    kept = build_config(config_file="fashion_mnist/massrl", overrides=["seed=1"])
    assert (kept.data.subset, kept.data.eval_subset) == (20000, 10000)
    assert kept.run_name == "massrl_fashion_mnist"
    assert capsys.readouterr().err == ""

    other = build_config(config_file="fashion_mnist/massrl",
                         overrides=["data.name=folder", "data.root=/photos", "data.eval_subset=50"])
    assert (other.data.subset, other.data.eval_subset, other.data.root) == (None, 50, "/photos")
    assert other.run_name == "massrl_folder"  # the run directory follows the dataset
    assert capsys.readouterr().err == (
        "note: data.name=folder replaces fashion_mnist/massrl's fashion_mnist: its "
        "data.subset=20000 is not applied (give it again to keep it)\n")

    imagenet = build_config(config_file="imagenet/byol", overrides=["data.name=imagenet100"])
    assert imagenet.data.root is None and "data.root=/data/imagenet" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.name: Input should be"):  # an invalid name
        build_config(config_file="fashion_mnist/massrl", overrides=["data.name=mnist"])
    assert capsys.readouterr().err == ""  # gets its error alone, not the note first


def test_config_error_names_its_sources_once():
    with pytest.raises(ConfigError) as err:
        build_config(config_file="cifar10/byol", overrides=["seed=1", "optimizer.lrr=1"])
    assert "(cifar10/byol + overrides)" in str(err.value)


def test_precision_short_forms_read_as_lightning_names():
    assert build_config(overrides=["trainer.precision=32"]).trainer.precision == "32-true"
    assert build_config(overrides=["trainer.precision=bf16"]).trainer.precision == "bf16-mixed"
    # whole-model low or double precision: refused before the run, not a dtype error at step 1
    for value in ("64", "64-true", "bf16-true", "16-true"):
        with pytest.raises(ConfigError, match="is not supported: massrl trains in 32-true or"):
            build_config(overrides=[f"trainer.precision={value}"])


@pytest.mark.parametrize("overrides, needs", [
    (["augment.view_mode=crops_x_strategies", "augment.num_crops=1", "augment.pairs=cross_crop"],
     "num_crops >= 2"),
    (["augment.strategies=[simclr]", "augment.pairs=cross_strategy"], "at least 2 strategies"),
    (["augment.view_mode=per_strategy", "augment.pairs=within_strategy"],
     "views that share a strategy"),
    (["augment.view_mode=per_strategy", "augment.strategies=[simclr]"],
     "at least 2 views per image"),
])
def test_view_layouts_that_select_no_pair_are_refused(overrides, needs):
    with pytest.raises(ConfigError, match=needs):
        build_config(overrides=overrides)


@pytest.mark.parametrize("overrides", [
    ["augment.pairs=within_strategy"],  # random mode: some batches, by chance
    ["augment.view_mode=crops_x_strategies", "augment.pairs=within_strategy"],
    ["augment.view_mode=crops_x_strategies", "augment.pairs=cross_crop"],
    ["augment.view_mode=per_strategy", "augment.pairs=cross_crop"],
    ["augment.strategies=[simclr]", "augment.pairs=within_strategy"],
])
def test_view_layouts_with_pairs_are_accepted(overrides):
    build_config(overrides=overrides)


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(ConfigError, match="cifar10/byol"):
        build_config(config_file="nope/nothing")


def test_cli_print_config_round_trips(capsys):
    assert main(["pretrain", "-c", "cifar10/byol", "optimizer.lr=0.7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optimizer"]["lr"] == 0.7
    assert RunConfig.model_validate(printed).method == "byol"


def test_cli_bad_key_exits_nonzero_with_message(capsys):
    assert main(["pretrain", "optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'optimizer.lr'" in err and "`massrl pretrain --help` lists" in err


def test_help_lists_options_with_defaults():
    out = subprocess.run([sys.executable, "-m", "massrl", "pretrain", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "augment.view_mode" in out and "default random" in out
    # what a plain `massrl pretrain` runs (its shipped config) where it differs from the schema
    width = next(line for line in out.splitlines() if line.strip().startswith("model.width "))
    assert "default 64 (without -c: 16)" in width
    view_mode = next(line for line in out.splitlines() if "augment.view_mode " in line)
    assert "without -c" not in view_mode  # the same in both
    top = subprocess.run([sys.executable, "-m", "massrl", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "pretrain" in top and "augviz" in top
    version = subprocess.run([sys.executable, "-m", "massrl", "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"massrl {massrl.__version__}"


def test_each_command_describes_its_own_keys(capsys):
    """augviz lists the keys it reads; an evaluation's data keys say what they do there."""
    for command in ("augviz", "knn"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        if command == "augviz":
            assert "augment.view_mode" in out and "data.image_size" in out
            assert "optimizer." not in out and "trainer." not in out and "resume" not in out
        else:
            assert "data.batch_size default 256 images per feature-extraction batch" in out
            assert "per-device batch size" not in out and "(monitors)" not in out


def test_the_command_exits_with_mains_code_and_skips_the_last_collections(monkeypatch):
    """The interpreter's final garbage collections over torch's and Lightning's objects took
    3-5 s after the run directory's line; the `massrl` command freezes them and exits."""
    import gc

    from massrl import cli

    frozen = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 3 and frozen == [True]
    bad = subprocess.run([sys.executable, "-m", "massrl", "pretrain", "optimizer.lrr=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Did you mean 'optimizer.lr'" in bad.stderr


def test_help_loads_no_torch():
    """--help answers at once: no command imports torch or Lightning for its options."""
    for argv in ([], ["--help"], *([c, "--help"] for c in COMMANDS)):
        code = "\n".join(["import sys", "from massrl.cli import main", "try:",
                          f"    main({argv!r})", "except SystemExit:", "    pass",
                          "print(sorted({'torch', 'lightning'} & set(sys.modules)))"])
        out = run_python(code, check=True).stdout
        assert out.strip().splitlines()[-1] == "[]", argv


def test_configs_symlink_points_at_package():
    root = Path(__file__).resolve().parents[1]
    if not (root / "configs").is_symlink():
        pytest.skip("not a checkout (an sdist has no configs/ shortcut)")
    assert (root / "configs").resolve() == (root / "src" / "massrl" / "configs").resolve()
    assert (root / "configs" / "fashion_mnist" / "massrl.yaml").is_file()


@pytest.mark.parametrize("override,message", [
    ("augment.simclr.blur_p=[1.2,0.1]", "less than or equal to 1"),
    ("augment.simclr.jitter=[0.4,0.4,0.2,0.7]", "must be <= 0.5"),
    ("augment.simclr.jitter=[0.4,-0.4,0.2,0.1]", "must be >= 0"),
    ("augment.simclr.blur=0", "augment.simclr.blur_p"),
])
def test_simclr_colour_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(overrides=[override])


def test_a_quoted_value_stays_a_string():
    assert build_config(overrides=['name="2021-01-01"']).name == "2021-01-01"


def test_settings_a_run_will_not_train_with_are_refused_when_it_starts():
    """(Not by the schema: checkpoints written before these checks must still load.) 1 px
    "trained"; 4 px stopped on a NaN gradient under bf16, the advice naming the lr; a UMAP
    picture no kNN check meets was never drawn."""
    from massrl.config.schema import check_training_data, check_training_settings

    for bad, message in ((["eval.umap_every=3", "eval.knn_every=2"], "make it a multiple of 2"),
                         (["eval.umap_every=1", "eval.knn_every=0"],
                          "set eval.knn_every too")):
        cfg = build_config(overrides=bad)  # (a stored config like it loads)
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_training_settings(cfg)
    check_training_settings(build_config(overrides=["eval.umap_every=0"]))  # 0 = off
    # data settings, once it is known whether the run continues a checkpoint: one that
    # trained so before may continue with the same value; a fresh run (resume=auto that found
    # nothing: a SLURM job's first start) or a resume that sets it anew may not
    small = build_config(overrides=["data.image_size=4", "resume=auto"])
    bright = build_config(overrides=["data.mean=[124,116,104]", "data.std=[58,57,57]"])
    for cfg, message in ((small, "data.image_size=4: train at 8 px or more"),
                         (bright, "data.mean=[124.0, 116.0, 104.0] looks like 0-255 values")):
        for saved in (None, {"data": {"image_size": 32, "mean": None}}):
            with pytest.raises(ConfigError, match=re.escape(message)):
                check_training_data(cfg, saved)
        check_training_data(cfg, cfg.model_dump(mode="json"))  # (the checkpoint's own)



def test_path_settings_expand_a_leading_tilde(monkeypatch, tmp_path):
    """YAML and quoted arguments keep ~ as typed: a run's own files went to a folder named ~ in
    the working directory while Lightning's loggers wrote into the home folder."""
    from massrl.eval.config import ExportConfig, KnnEvalConfig, UmapEvalConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = build_config(overrides=["output_dir=~/runs/a", "resume=~/a/last.ckpt"])
    assert (cfg.output_dir, cfg.resume) == (f"{tmp_path}/runs/a", f"{tmp_path}/a/last.ckpt")
    assert build_config(overrides=["resume=auto", "output_dir=runs/~a"]).output_dir == "runs/~a"
    knn = KnnEvalConfig(ckpt="~/a/last.ckpt", output_dir="~/evals")
    assert (knn.ckpt, knn.output_dir) == (f"{tmp_path}/a/last.ckpt", f"{tmp_path}/evals")
    assert UmapEvalConfig(ckpt="c.ckpt", out="~/u.png").out == f"{tmp_path}/u.png"
    assert ExportConfig(ckpt="c.ckpt", out="~/b.pt").out == f"{tmp_path}/b.pt"


def test_every_path_setting_of_every_command_expands_a_tilde(monkeypatch, tmp_path):
    """cache_dir=~/feats made a folder named ~ in the working directory: one path key had
    been declared a plain str. Every key that names a file or folder, in every command."""
    from pydantic import BaseModel

    from massrl.config.files import PATH_KEYS
    from massrl.eval.config import ExportConfig, KnnEvalConfig, LinearEvalConfig, UmapEvalConfig

    monkeypatch.setenv("HOME", str(tmp_path))

    def path_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        keys = []
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                keys += path_keys(kind, f"{prefix}{name}.")
            elif name in PATH_KEYS - {"name", "plugins"} and "str" in repr(kind):
                keys.append(prefix + name)
        return keys

    checked = []
    for model in (RunConfig, KnnEvalConfig, LinearEvalConfig, UmapEvalConfig, ExportConfig):
        for key in path_keys(model):
            tree = {} if model is RunConfig else {"ckpt": "c.ckpt"}
            *sections, name = key.split(".")
            place = tree
            for section in sections:
                place = place.setdefault(section, {})
            place[name] = "~/x"
            value = model.model_validate(tree)
            for part in key.split("."):
                value = getattr(value, part)
            assert value == f"{tmp_path}/x", (model.__name__, key, value)
            checked.append(key)
    assert len(checked) >= 10 and "cache_dir" in checked, checked


def test_a_windows_path_in_double_quotes_gets_a_hint(tmp_path):
    """YAML reads \\U in "C:\\Users\\..." as an escape: its message alone did not say why."""
    config = tmp_path / "win.yaml"
    config.write_text('output_dir: "C:\\Users\\me\\runs"\n')
    with pytest.raises(ConfigError, match="(?s)is not valid YAML: .*a backslash inside double "
                                          "quotes starts an escape: write paths with / or "
                                          "inside 'single quotes'"):
        build_config(config_file=str(config))
    config.write_text("output_dir: 'C:\\Users\\me\\runs'\n")
    assert build_config(config_file=str(config)).output_dir == "C:\\Users\\me\\runs"


def test_an_escape_yaml_accepts_in_a_path_is_refused_too(tmp_path, monkeypatch):
    """"D:\\runs\\test" in double quotes is valid YAML: D: with a carriage return and a tab, and
    a data.root with \\b lost a letter ("not found: .../dsad"); `-c ~/x.yaml` was not found."""
    config = tmp_path / "win.yaml"
    config.write_text('output_dir: "D:\\runs\\test"\n')
    with pytest.raises(ConfigError, match="output_dir='D:\\\\runs\\\\test' holds a control "
                                          "character: inside YAML's double quotes a backslash"):
        build_config(config_file=str(config))
    with pytest.raises(ConfigError, match="data.root=.* holds a control character"):
        build_config(overrides=['data.root="/data/ds\\bad"'])
    monkeypatch.setenv("HOME", str(tmp_path))
    config.write_text("output_dir: 'D:/runs'\n")
    assert build_config(config_file="~/win.yaml").output_dir == "D:/runs"


def test_multi_line_text_outside_paths_is_left_alone():
    """A YAML block scalar (a plugin's text setting) holds newlines: only paths are checked."""
    from massrl.config.files import check_typed_text

    check_typed_text("method_kwargs.note", "line one\nline two\n")
    check_typed_text("wandb.notes", "tab\there")
    with pytest.raises(ConfigError, match="name=.* holds a control character"):
        check_typed_text("name", "D:\runs\test")  # (the run's folder: runs/<name>/version_N)
    with pytest.raises(ConfigError, match="data.root='/d/x\\\\ty' holds a control character"):
        check_typed_text("data", {"root": "/d/x\ty"})
    with pytest.raises(ConfigError, match="plugins=.* holds a control character"):
        check_typed_text("plugins", ["./a\rb.py"])


def test_the_command_line_entry_leaves_the_callers_output_streams_as_they_were():
    """massrl.cli.main from Python switched stdout and stderr to backslashreplace for good."""
    code = ("import sys\nfrom massrl.cli import main\n"
            "before = (sys.stdout.errors, sys.stderr.errors)\n"
            "main(['pretrain', 'no_such_key=1'])\n"
            "print(before == (sys.stdout.errors, sys.stderr.errors), sys.stdout.errors)\n")
    out = run_python(code, timeout=120)
    assert out.stdout.split()[-2] == "True", out.stderr[-2000:]
