"""benchmarks/tiny_topk_quality.py without running it: its arguments, the csd-distill command lines it
builds (every one must parse against the current config, which the tiny demo's restructuring broke
once), and how it reads the tiny demo's stages.json."""

import importlib.util
import json
import os

import pytest

from csd_ext.distill.cli import parse_config

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "tiny_topk_quality.py")


@pytest.fixture(scope="module")
def topk():
    spec = importlib.util.spec_from_file_location("tiny_topk_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [["--ks", "0,-1"], ["--ks", "a"], ["--ks", ""], ["--kd-ratios", "0"],
                                  ["--kd-ratios", "1.5"], ["--lr", "0"]])
def test_bad_arguments_are_refused(topk, argv, capsys):
    with pytest.raises(SystemExit):
        topk.parse_args(argv)
    assert "--" in capsys.readouterr().err


def test_every_command_line_parses_against_the_current_config(topk, tmp_path):
    a = topk.parse_args(["--out-dir", str(tmp_path / "t"), "--ks", "0,8", "--kd-ratios", "1,0.5", "--lr", "3e-3",
                         "--set", "tiny.teacher_steps=7", "--set", "tiny.student_steps=5"])
    assert a.k_list == [0, 8] and a.ratio_list == [1.0, 0.5] and os.path.isabs(a.out_dir)
    _, cfg = parse_config(topk.preset_argv(a.set))
    assert cfg.tiny.student_steps == 5 and cfg.eval_greedy and cfg.eval_seeds == []

    # The stage run: the user's settings for the stages, the contest cut to one short run.
    _, st = parse_config(topk.stages_argv(cfg, a.set, a.lr, a.out_dir))
    assert st.pipeline == "tiny" and st.tiny.teacher_steps == 7 and st.output_dir == str(tmp_path / "t" / "stages")
    assert st.tiny.contestants == [{"name": "CSD", "loss": cfg.loss, "loss_args": cfg.loss_args}]
    assert st.tiny.lr_grid == [3e-3] and len(st.tiny.seeds) == 1 and st.tiny.random_start == ""
    assert st.tiny.student_steps == 1

    data = {"teacher": "T", "student": "S", "train": "train.jsonl", "eval": "test.jsonl"}
    _, live = parse_config(topk.student_argv(a, cfg, data, "out-live", teacher="T"))
    _, cached = parse_config(topk.student_argv(a, cfg, data, "out-k8", cache="C", kd_ratio=0.5))
    for run in (live, cached):  # same start, data, steps and learning rate for every row
        assert (run.pipeline, run.student, run.train_data, run.eval_data) == ("distill", "S", "train.jsonl",
                                                                              "test.jsonl")
        assert run.max_steps == 5 and run.lr == 3e-3 and run.eval_max_examples == cfg.tiny.n_eval
        assert (run.loss, run.loss_args, run.seed, run.batch_size) == (cfg.loss, cfg.loss_args, cfg.seed,
                                                                     cfg.batch_size)
    assert live.teacher == "T" and live.teacher_cache is None and live.eval_teacher
    assert live.kd_ratio == cfg.kd_ratio
    assert cached.teacher is None and cached.teacher_cache == "C" and cached.kd_ratio == 0.5
    assert not cached.eval_teacher

    from csd_ext.distill.cache_teacher import add_cache_arguments

    args, cache_cfg = parse_config(topk.cache_argv(a, data, "C", 8)[1:], extend_parser=add_cache_arguments,
                                   fill={"student": "(unused)"})
    assert (cache_cfg.teacher, cache_cfg.train_data, cache_cfg.eval_data, args.top_k, args.output) == (
        "T", "train.jsonl", "test.jsonl", 8, "C")
    for key in ("prompt_template", "max_length", "max_prompt_length"):  # what the cache's index must match
        assert getattr(cache_cfg, key) == getattr(cached, key)


def test_stages_json_paths_are_resolved_and_checked(topk, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("teacher", "student"):
        (tmp_path / d).mkdir()
    (tmp_path / "data").mkdir()
    for f in ("train", "test"):
        (tmp_path / "data" / f"{f}.jsonl").write_text("")
    where = {"teacher": "teacher", "student_pretrained": str(tmp_path / "student"),
             "data": {"train": "data/train.jsonl", "test": "data/test.jsonl", "dev": "data/dev.jsonl"}}
    path = tmp_path / "stages.json"
    path.write_text(json.dumps(where))
    got = topk.read_stages(str(path))
    assert got == {"teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student"),
                   "train": str(tmp_path / "data" / "train.jsonl"), "eval": str(tmp_path / "data" / "test.jsonl")}
    (tmp_path / "teacher").rmdir()
    with pytest.raises(SystemExit, match="the teacher it names is missing"):
        topk.read_stages(str(path))
    path.write_text(json.dumps({"teacher": "x"}))  # the old layout, or another file
    with pytest.raises(SystemExit, match="not a tiny-demo stages.json"):
        topk.read_stages(str(path))


def test_an_out_dir_of_other_settings_is_refused(topk, tmp_path):
    out = str(tmp_path / "t")
    topk.check_settings(out, {"set": ["tiny.teacher_steps=7"], "lr": 1e-3})
    topk.check_settings(out, {"set": ["tiny.teacher_steps=7"], "lr": 1e-3})  # the same: reused
    with pytest.raises(SystemExit, match="other settings"):
        topk.check_settings(out, {"set": [], "lr": 1e-3})
