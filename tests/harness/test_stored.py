"""labsupport.harness.stored: the stored GPU runs under benchmarks/results/, found and read back."""

import json

import pytest

from labsupport.harness import stored


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake checkout with benchmarks/results/, the notebook's folder as cwd, and the real checkout hidden."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setattr(stored, "_checkout_root", lambda: tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "notebooks")
    return tmp_path / "benchmarks" / "results"


def test_found_from_the_notebooks_folder_and_the_root(checkout, monkeypatch):
    (checkout / "run_h100.json").write_text(json.dumps({"info": {"device": "GPU"}, "rows": [1, 2]}))
    assert stored.find_stored_results("run_h100.json") == checkout / "run_h100.json"
    assert stored.load_stored_json("run_h100.json") == {"info": {"device": "GPU"}, "rows": [1, 2]}
    monkeypatch.chdir(checkout.parent.parent)
    assert stored.load_stored_json("run_h100.json")["rows"] == [1, 2]


def test_found_through_the_checkout_the_package_came_from(tmp_path, monkeypatch):
    results = tmp_path / "repo" / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "x.json").write_text("[3]")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    monkeypatch.setattr(stored, "_checkout_root", lambda: tmp_path / "repo")
    assert stored.load_stored_json("x.json") == [3]


def test_not_found_is_none(checkout):
    assert stored.find_stored_results("missing.json") is None
    assert stored.load_stored_json("missing.json") is None
    assert stored.load_stored_text("missing.txt") is None


@pytest.mark.parametrize("name", ["results.csv", "", ".json", "../x.json", "a/b.json", None, 3])
def test_bad_names_are_refused(checkout, name):
    with pytest.raises(ValueError, match="file name"):
        stored.find_stored_results(name)


def test_load_refuses_a_non_json_name_and_names_a_broken_file(checkout):
    with pytest.raises(ValueError, match=".json"):
        stored.load_stored_json("profile.txt")
    with pytest.raises(ValueError, match=".txt"):
        stored.load_stored_text("run.json")
    (checkout / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        stored.load_stored_json("broken.json")


PROFILE = """

## layer, T=16, E=8: 5 forward + backward passes
-------  ---
  Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg     Self CUDA   Self CUDA %    CUDA total  CUDA time avg    # of Calls
aten::_grouped_mm   1.68%  707.963us   4.04%   1.701ms   56.685us   11.342ms   44.31%   11.342ms   378.071us   30
_ZN7cutlass13device_kernelIN2at...   0.00%   0.000us   0.00%   0.000us   0.000us   3.802ms   14.86%   3.802ms   380.233us   10
aten::gelu   0.14%   58.519us   0.24%   102.110us   20.422us   951.296us   3.72%   951.296us   190.259us   5
Self CPU time total: 42.143ms
Self CUDA time total: 25.596ms


## dense, T=16, E=8: 3 forward + backward passes
aten::mm   2.84%   483.756us   3.82%   651.535us   32.577us   7.020ms   44.50%   7.020ms   351.005us   20
Self CUDA time total: 15.777ms
"""


def test_profile_section_reads_self_cuda_and_calls():
    layer = stored.profile_section(PROFILE, "layer")
    assert layer["passes"] == 5 and layer["cuda_total_ms"] == pytest.approx(25.596)
    assert layer["ops"] == {"aten::_grouped_mm": (pytest.approx(11.342), 30), "aten::gelu": (pytest.approx(0.951296), 5)}
    dense = stored.profile_section(PROFILE, "dense")
    assert dense["passes"] == 3 and dense["ops"]["aten::mm"] == (pytest.approx(7.02), 20)
    assert stored.profile_section(PROFILE, "missing") is None
    with pytest.raises(TypeError):
        stored.profile_section(PROFILE, "")


def test_the_stored_h100_runs_of_this_checkout_read():
    """The files the notebooks quote are there and have the keys the cells read."""
    for name in ("linear_attention_gpu_h100.json", "moe_gpu_h100.json", "diffusion_gpu_h100.json",
                 "sparse_gpu_h100.json", "flash_steps_h100.json"):
        run = stored.load_stored_json(name)
        assert run is not None and "rows" in run and run["rows"], name
    profile = stored.profile_section(stored.load_stored_text("moe_gpu_h100_profile.txt"), "moe_layer")
    assert profile["passes"] == 5 and "aten::_grouped_mm" in profile["ops"]


def test_jsonl_rows_are_read_and_a_missing_file_gives_no_rows(checkout):
    """Chapter 07 reads its grid through load_stored_rows; a name that is not .jsonl is refused."""
    (checkout / "grid.jsonl").write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n")
    assert stored.load_stored_rows("grid.jsonl") == [{"a": 1}, {"a": 2}]
    assert stored.load_stored_rows("no_such_grid.jsonl") == []
    (checkout / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl"):
        stored.load_stored_rows("broken.jsonl")
    with pytest.raises(ValueError, match="jsonl"):
        stored.load_stored_rows("grid.json")
