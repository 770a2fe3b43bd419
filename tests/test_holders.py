"""Who keeps what grew (`safetrain.diagnostics.holders`): the named place that holds live arrays, tensors or bytes,
and the lines of the user's code that add to it, on real objects in this process."""

import linecache
import textwrap

import numpy as np

from safetrain.diagnostics.holders import array_addresses, holders, mutations
from safetrain.diagnostics.sites import Sites

MIB = 2**20


class Keeper:
    def __init__(self):
        self.outputs = []

    def keep(self, value):
        self.outputs.append(value)


def test_an_attribute_list_is_named_with_its_class_and_the_line_that_appends():
    keeper = Keeper()
    for _ in range(8):
        keeper.keep(np.ones((256, 1024), "float32"))  # 1 MiB each
    (found,) = holders({"ndarray"}, Sites(__file__), limit=1, min_bytes=4 * MIB)
    assert (found["holder"], found["kind"], found["objects"]) == ("Keeper.outputs", "attribute", 8)
    assert found["bytes"] == 8 * MIB and found["watched_bytes"] == 0
    (line,) = found["lines"]
    assert line[0] == __file__ and linecache.getline(__file__, line[1]).strip() == "self.outputs.append(value)"


def test_a_local_of_a_running_function_and_nested_lists_are_found_and_watched_arrays_counted():
    def loop():
        history = []
        for _ in range(6):
            step = [np.ones((512, 512), "float32"), np.ones((512,), "float32")]  # 1 MiB and 2 KiB per step
            history += [step]
        watch = set(array_addresses(history[:3]))
        return holders({"ndarray"}, Sites(__file__), watch=watch, min_bytes=4 * MIB), history

    (found,), _ = loop()
    assert (found["holder"], found["kind"], found["objects"]) == ("loop.history", "local", 12)
    assert found["watched_bytes"] == 3 * (MIB + 2048)
    (line,) = found["lines"]
    assert linecache.getline(__file__, line[1]).strip() == "history += [step]"


def test_small_holders_are_left_out():
    keeper = Keeper()
    keeper.keep(np.ones(1000))
    assert [h for h in holders({"ndarray"}, Sites(__file__)) if h["holder"] == "Keeper.outputs"] == []


def test_mutations_finds_every_way_of_adding_to_a_container(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(
        textwrap.dedent(
            """\
            history = {"loss": []}
            outputs = []
            for step in range(10):
                history["loss"].append(step)
                outputs.extend([step])
                outputs += [step]
                outputs[0] = step
                outputs = outputs + [step]
                other.append(step)
                self.outputs.insert(0, step)
                print(outputs)
            """
        )
    )
    assert mutations("outputs", str(path)) == [5, 6, 7, 8, 10]
    assert mutations("history", str(path)) == [4]
    assert mutations("outputs", str(path), span=(5, 6)) == [5, 6]
    assert mutations("outputs", str(tmp_path / "missing.py")) == []
