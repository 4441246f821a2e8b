"""The scenes generator (issue 39, groundwork): a fixed, seeded test split whose answers follow from
the drawn objects."""

import hashlib
import re
from collections import Counter

from illava_tasks import scenes


def test_the_test_split_is_fixed_and_large_enough():
    split = scenes.test_split()
    assert len(split) == 1200
    text = "\n".join(f"{s.seed} {k} {q} {a}" for s, k, q, a in split)
    again = "\n".join(f"{s.seed} {k} {q} {a}" for s, k, q, a in scenes.test_split())
    assert text == again
    kinds = Counter(k for _, k, _, _ in split)
    assert set(kinds) == set(scenes.KINDS) and min(kinds.values()) >= 100, kinds
    presence = Counter(a for _, k, _, a in split if k == "presence")
    assert abs(presence["yes"] - presence["no"]) <= 0.1 * sum(presence.values()), presence
    chance = scenes.chance(split)  # the best image-blind guess per kind
    assert chance["presence"] <= 0.55 and all(v < 0.5 for k, v in chance.items() if k != "presence"), chance
    train = {s.seed for s, _, _, _ in scenes.train_split(300)}
    assert not train & {s.seed for s, _, _, _ in split}  # never the test scenes


def test_images_are_deterministic_and_objects_do_not_overlap():
    for s, _, _, _ in scenes.test_split(60):
        a, b = s.image(), scenes.scene(s.seed).image()
        assert a.size == (224, 224) and hashlib.sha1(a.tobytes()).digest() == hashlib.sha1(b.tobytes()).digest()
        assert 2 <= len(s.things) <= 6
        for i, t in enumerate(s.things):
            assert 14 <= t.size <= 84 and 0 <= t.box()[0] and t.box()[2] <= 224
            for o in s.things[i + 1 :]:
                x0, y0, x1, y1 = t.box()
                u0, v0, u1, v1 = o.box()
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, (t, o)


def test_every_answer_follows_from_the_objects():
    for s, kind, q, a in scenes.test_split():
        things = s.things
        if kind == "count":
            what = re.match(r"how many (\w+?)s? (?:shapes )?are there\?", q).group(1)
            n = sum(t.shape == what or t.colour == what for t in things)
            assert a == str(n), (q, a, things)
        elif kind == "presence":
            colour, shape = re.match(r"is there a (\w+) (\w+)\?", q).groups()
            assert a == ("yes" if any(t.colour == colour and t.shape == shape for t in things) else "no")
        elif kind == "smallest":
            small = min(things, key=lambda t: t.size)
            assert sorted(t.size for t in things)[1] >= 1.5 * small.size
            assert a == (small.colour if "colour" in q else small.shape)
        elif kind == "attribute":
            m = re.match(r"what (colour|shape) is the (\w+)(?: shape)?\?", q)
            named = [t for t in things if m.group(2) in (t.shape, t.colour)]
            assert len(named) == 1, (q, things)
            assert a == (named[0].colour if m.group(1) == "colour" else named[0].shape)
        else:
            m = re.match(r"what colour is the shape (left of|right of|above|below) the (.+)\?", q)
            side, ref_text = m.groups()
            words = ref_text.replace(" shape", "").split()
            refs = [t for t in things if all(w in (t.shape, t.colour) for w in words)]
            assert len(refs) == 1, (q, things)
            hits = [o for o in things if o is not refs[0] and scenes.SIDES[side](o, refs[0])]
            assert len(hits) == 1 and a == hits[0].colour, (q, a, things)
