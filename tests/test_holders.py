"""Who keeps what grew (`safetrain.diagnostics.holders`): the named place that holds live arrays, tensors or bytes,
and the lines of the user's code that add to it, on real objects in this process."""

import collections
import gc
import linecache
import sys
import textwrap
import weakref

import numpy as np

from safetrain.diagnostics import census
from safetrain.diagnostics.holders import holders, mutations
from safetrain.diagnostics.sites import Sites

MIB = 2**20


def source(line):
    return linecache.getline(__file__, line[1]).strip()


class Keeper:
    def __init__(self):
        self.outputs = []
        self.by_epoch = {}

    def keep(self, value):
        self.outputs.append(value)

    def keep_at(self, epoch, value):
        self.by_epoch[epoch] = value


class Shared:
    kept = []  # a class attribute: every instance appends to the same list

    def keep(self, value):
        Shared.kept.append(value)


def find(name, **kwargs):
    return {h["holder"]: h for h in holders({"ndarray"}, Sites(__file__), limit=10, **kwargs)}.get(name)


def test_an_attribute_list_is_named_with_its_class_and_the_line_that_appends():
    keeper = Keeper()
    for _ in range(8):
        keeper.keep(np.ones((256, 1024), "float32"))  # 1 MiB each
    found = find("Keeper.outputs", min_bytes=4 * MIB)
    assert (found["kind"], found["objects"], found["bytes"], found["watched_bytes"]) == ("attribute", 8, 8 * MIB, 0)
    (line,) = found["lines"]
    assert line[0] == __file__ and source(line) == "self.outputs.append(value)"


def test_each_array_counts_once_views_count_their_base_and_watched_arrays_are_counted():
    keeper = Keeper()
    block = np.ones((256, 1024), "float32")  # 1 MiB
    for _ in range(64):
        keeper.keep(block)  # the same array 64 times: 1 MiB held, not 64
    for _ in range(6):
        base = np.ones((512, 512), "float32")  # 1 MiB, kept only through its view
        keeper.keep(base[:, 0])
    watch = {id(block)}
    found = find("Keeper.outputs", min_bytes=4 * MIB, watch=watch)
    assert (found["objects"], found["bytes"], found["watched_bytes"]) == (7, 7 * MIB, MIB)


def test_arrays_in_a_dict_with_int_keys_and_in_untracked_tuples_are_found():
    keeper = Keeper()
    for epoch in range(6):
        keeper.keep_at(epoch, np.ones((256, 1024), "float32"))  # a dict of arrays: untracked after a collection
        keeper.keep((np.ones((256, 1024), "float32"), epoch))  # a tuple of an array and an int: untracked too
    gc.collect()
    assert not gc.is_tracked(keeper.by_epoch) and not gc.is_tracked(keeper.outputs[0])
    assert census()["ndarray"][1] >= 12 * MIB  # the census sees them through the untracked dict and tuples
    by_epoch, outputs = find("Keeper.by_epoch", min_bytes=4 * MIB), find("Keeper.outputs", min_bytes=4 * MIB)
    assert (by_epoch["objects"], outputs["objects"]) == (6, 6)
    assert source(by_epoch["lines"][0]) == "self.by_epoch[epoch] = value"


def test_a_class_attribute_and_nested_lists_in_a_global_are_named():
    for _ in range(5):
        Shared().keep([np.ones((256, 1024), "float32"), np.ones(10)])
    found = find("Shared.kept", min_bytes=4 * MIB)
    assert found["objects"] == 10 and source(found["lines"][0]) == "Shared.kept.append(value)"
    Shared.kept.clear()


def test_holders_keep_nothing_alive_and_ignore_small_holders_and_what_did_not_grow():
    def loop():
        local = [np.ones((256, 1024), "float32") for _ in range(6)]
        big = [np.ones((2048, 1024), "float32")]  # 8 MiB in one array: most bytes, one object
        found = holders({"ndarray"}, Sites(__file__), limit=10, min_bytes=4 * MIB, min_objects=3)
        alive = weakref.ref(local[0])
        del local
        gc.collect()
        return found, alive, big

    found, alive, _ = loop()
    assert alive() is None  # reading the running function did not keep its locals
    names = [h["holder"] for h in found]
    assert "loop.big" not in names  # one object, fewer than min_objects
    if sys.version_info >= (3, 13):  # locals of running functions are read only where that keeps nothing
        assert "loop.local" in names


def test_an_object_that_raises_on_every_attribute_is_left_out_not_raised():
    class Odd:
        __slots__ = ("data",)

        def __getattr__(self, name):
            raise KeyError(name)

    odd = Odd()
    odd.data = collections.deque(np.ones((256, 1024), "float32") for _ in range(6))
    found = holders({"ndarray"}, Sites(__file__), limit=10, min_bytes=4 * MIB)
    assert all(h["bytes"] >= 4 * MIB for h in found)  # it ran through; the deque has no nameable holder


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
    (tmp_path / "deep.py").write_text("x = " + "(" * 5000 + ")" * 5000)
    assert mutations("x", str(tmp_path / "deep.py")) == []  # too deep to parse: no lines, no error
