"""Labelling app: manifests, queues, durable answers, TIA2 export, tally; fault tests on a real server process."""
from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pandas as pd
import pytest
from labeling_helpers import PAIR, Annotator, Server, make_comparison, make_manifest
from scipy.stats import beta

from tn_ray.cli import main
from tn_ray.data.tia2 import load_labels
from tn_ray.errors import InputError
from tn_ray.labeling.export import tia2_labels, write_json
from tn_ray.labeling.security import UnsafePath, check_name, needs_token
from tn_ray.labeling.store import AnswerStore, Forbidden
from tn_ray.labeling.tally import tally
from tn_ray.labeling.tasks import load_comparison, load_folder, load_manifest, load_run

# ---------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "text, line, says",
    [
        ("img,prompt\nimg/s0.png,a\n", 1, "missing column"),
        ("image,prompt\nimg/s0.png,a\nimg/s1.png,b,extra\n", 3, "fields"),
        ("image,prompt\nimg/s0.png,a\nimg/nope.png,b\n", 3, "not found"),
        ("image,prompt\nimg/s0.png,a\nimg/s1.png,\n", 3, "empty prompt"),
        (
            'image,prompt\nimg/s0.png,a\n"img/s1.png","multi\nline"\nimg/s0.png,c\n',
            5,
            r"already listed at .*bad\.csv:2 ",
        ),
        ("image,prompt\nmanifest.csv,a\n", 2, "not an image"),
        ("", 1, "empty file"),
    ],
)
def test_malformed_manifest_names_file_and_line(tmp_path, text, line, says):
    make_manifest(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(InputError, match=rf"bad\.csv:{line}: .*{says}"):
        load_manifest(bad)


def test_malformed_manifest_fails_before_serving(tmp_path, capsys):
    make_manifest(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,prompt\nimg/s0.png,a\nimg/missing.png,b\n")
    assert main(["label", "serve", "--manifest", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr()
    assert f"{bad}:3: image 'img/missing.png' not found" in err.err and "serving" not in err.out
    assert not (tmp_path / "bad.answers.sqlite").exists()


def test_malformed_comparison_key_names_line(tmp_path):
    out, key = make_comparison(tmp_path, prompts=2)
    lines = key.read_text().splitlines()
    lines[2] = lines[2].replace('"[""img/', '"[""../../img/', 1)
    key.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"human_eval_key\.csv:3: set1_files .*refused image name"):
        load_comparison(out, key)


def test_folder_with_captions_and_bestofn_run(tmp_path):
    make_manifest(tmp_path, n=3)
    for i in range(3):
        (tmp_path / "img" / f"s{i}.txt").write_text(f"  {i} red\ncubes \n")
    task = load_folder(tmp_path / "img")
    assert [(i.item_id, i.prompt) for i in task.items] == [(f"s{i}.png", f"{i} red cubes") for i in range(3)]
    (tmp_path / "img" / "s1.txt").unlink()
    with pytest.raises(InputError, match=r"s1\.png: no caption file s1\.txt"):
        load_folder(tmp_path / "img")
    run = tmp_path / "run"  # the columns tn-ray bestofn writes to rewards.parquet
    table = pd.DataFrame(
        {
            "prompt_id": [0, 0],
            "sample": [0, 1],
            "prompt": ["a", "a"],
            "image_id": ["00000_000", "00000_001"],
            "image": [str(tmp_path / "img" / "s0.png"), str(tmp_path / "img" / "s2.png")],
            "clip:tiny": [0.1, 0.2],
        }
    )
    run.mkdir()
    table.to_parquet(run / "rewards.parquet")
    assert [i.item_id for i in load_run(run).items] == ["00000_000", "00000_001"]
    table.assign(image=["s3://bucket/a.png", "x.png"]).to_parquet(run / "rewards.parquet")
    with pytest.raises(InputError, match=r"rewards\.parquet: row 0: image s3://bucket/a\.png is not a local file"):
        load_run(run)


def test_finetuning_run_evaluation_images(tmp_path):
    """A tn-ray rwr / ddpo run folder: the base model's and every checkpoint's evaluation images, each
    with its prompt from eval/prompts.json (the layout tn_ray.training.evaluation writes)."""
    from tn_ray.training.checkpoint import step_name

    run = tmp_path / "rwr"
    png = (make_manifest(tmp_path, n=1).parent / "img" / "s0.png").read_bytes()
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "prompts.json").write_text(json.dumps(["a red cube", "two blue cats"]))
    for folder in ["base", step_name(3), step_name(6)]:
        (run / "eval" / folder).mkdir()
        for pid, seed in [(0, 0), (0, 1), (1, 0)]:
            (run / "eval" / folder / f"{pid:05d}-{seed}.png").write_bytes(png)
    task = load_run(run)
    assert len(task.items) == 9 and task.items[0].item_id == "eval/base/00000-0.png"
    assert [(i.item_id, i.prompt) for i in task.items[-3:]] == [
        (f"eval/{step_name(6)}/00000-0.png", "a red cube"),
        (f"eval/{step_name(6)}/00000-1.png", "a red cube"),
        (f"eval/{step_name(6)}/00001-0.png", "two blue cats"),
    ]
    (run / "eval" / "base" / "00007-0.png").write_bytes(png)  # a prompt id the list does not have
    with pytest.raises(InputError, match=r"00007-0\.png: not an evaluation image .* of .*prompts\.json"):
        load_run(run)


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "img/../../x.png", "/etc/passwd", "..", "a\\..\\b", "C:/x", "~/x", "a/\x00"]
)
def test_unsafe_image_names_refused(name):
    with pytest.raises(UnsafePath):
        check_name(name)


def test_token_needed_off_loopback_only():
    assert not any(needs_token(h) for h in ("127.0.0.1", "::1", "localhost"))
    assert all(needs_token(h) for h in ("0.0.0.0", "127.0.0.2", "10.1.2.3", "::"))


# ---------------------------------------------------------------------------------------- store


def test_queues_each_item_to_n_annotators_never_twice(tmp_path):
    task = load_manifest(make_manifest(tmp_path, n=4))
    store = AnswerStore(tmp_path / "a.sqlite", task, per_item=2)
    names = ["ann", "ben", "cat"]
    for n in names:
        store.login(n, None)
    seen = {n: [] for n in names}
    for _ in range(10):  # interleaved turns until everyone is done
        for n in names:
            item = store.assign_next(n)
            if item is not None:
                seen[n].append(item)
                store.answer(n, item, 1)
    assert all(len(s) == len(set(s)) for s in seen.values())  # never twice to one annotator
    counts = {i.item_id: sum(i.item_id in s for s in seen.values()) for i in task.items}
    assert set(counts.values()) == {2}  # every item exactly per_item times
    assert store.assign_next("ann") is None
    with pytest.raises(Forbidden):  # an item someone else holds cannot be answered
        store.answer("cat", next(i for i in counts if i not in seen["cat"]), 0)


def test_abandoned_assignment_frees_its_slot_after_the_lease(tmp_path):
    task = load_manifest(make_manifest(tmp_path, n=1))
    held = AnswerStore(tmp_path / "a.sqlite", task, per_item=1, lease_s=3600)
    assert held.assign_next("ann") == "img/s0.png" and held.assign_next("ben") is None
    expired = AnswerStore(tmp_path / "a.sqlite", task, per_item=1, lease_s=0)
    assert expired.assign_next("ben") == "img/s0.png"
    expired.answer("ben", "img/s0.png", 1)
    assert expired.assign_next("cat") is None  # answered slots never expire


def test_concurrent_annotators_never_collide(tmp_path):
    task = load_manifest(make_manifest(tmp_path, n=12))
    path = tmp_path / "a.sqlite"
    AnswerStore(path, task, per_item=1)
    got, errors = {}, []

    def work(name):
        store = AnswerStore(path, task, per_item=1)  # own connection, as separate processes would
        store.login(name, None)
        mine = []
        try:
            while (item := store.assign_next(name)) is not None:
                store.answer(name, item, 0)
                mine.append(item)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
        got[name] = mine

    threads = [threading.Thread(target=work, args=(f"a{i}",)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    taken = [i for m in got.values() for i in m]
    assert sorted(taken) == sorted(i.item_id for i in task.items)  # each exactly once
    assert len(AnswerStore(path, task, per_item=1).all_answers()) == 12


def test_database_of_another_task_refused(tmp_path):
    AnswerStore(tmp_path / "a.sqlite", load_manifest(make_manifest(tmp_path / "x", n=3)))
    with pytest.raises(InputError, match="belongs to another label task"):
        AnswerStore(tmp_path / "a.sqlite", load_manifest(make_manifest(tmp_path / "y", n=4)))


def test_names_are_claimed_by_their_secret(tmp_path):
    store = AnswerStore(tmp_path / "a.sqlite", load_manifest(make_manifest(tmp_path, n=2)))
    secret, created = store.login("alice", None)
    assert created and store.login("alice", secret) == (secret, False)
    for wrong in (None, "guess"):
        with pytest.raises(Forbidden):
            store.login("alice", wrong)
    with pytest.raises(ValueError):
        store.login("<script>", None)


# ---------------------------------------------------------------------------------------- outputs


def test_export_is_tia2_format(tmp_path):
    task = load_manifest(make_manifest(tmp_path, n=4))
    store = AnswerStore(tmp_path / "a.sqlite", task)
    given = {"ann": [1, 0, -1, 1], "ben": [1, 1, 0, 0], "cat": [0, 0, -1]}  # cat stops before the last image
    for name, labels in given.items():
        store.login(name, None)
        for value in labels:
            store.answer(name, store.assign_next(name), value)
    labels, short = tia2_labels(task, store.all_answers())
    assert short == ["img/s3.png"]
    write_json(labels, tmp_path / "tia2" / "human_annotations" / "human_labels_counting.json")
    df = load_labels("counting", tmp_path / "tia2")
    assert list(df["image_id"]) == ["img/s0.png", "img/s1.png", "img/s2.png"]
    assert list(df["prompt"]) == [i.prompt for i in task.items[:3]]
    assert [list(x) for x in df["labels"]] == [[1, 1, 0], [0, 1, 0], [-1, 0, -1]]


def test_tally_matches_independent_counts_and_exact_ci(tmp_path):
    task = load_comparison(*make_comparison(tmp_path, prompts=3))
    rng = np.random.default_rng(1)
    answers, expected = [], {"alignment": [0, 0, 0], "quality": [0, 0, 0]}
    for annotator in ("a", "b", "c", "d"):
        for item in task.items:
            value = {c: str(rng.choice(["set1", "tie", "set2"])) for c in ("alignment", "quality")}
            answers.append({"item_id": item.item_id, "annotator": annotator, "value": value})
            for crit, choice in value.items():
                winner = None if choice == "tie" else task.key[item.item_id][int(choice[-1]) - 1]
                expected[crit][{PAIR[0]: 0, None: 1, PAIR[1]: 2}[winner]] += 1
    table = tally(task, answers).set_index("criterion")
    for crit, (w, t, lose) in expected.items():
        row = table.loc[crit]
        assert (row["reward_a"], row["reward_b"]) == PAIR
        assert (row["win"], row["tie"], row["lose"], row["n"]) == (w, t, lose, 12)
        lo, hi = beta.ppf(0.025, w, 12 - w + 1) if w else 0.0, beta.ppf(0.975, w + 1, 12 - w) if w < 12 else 1.0
        assert row["win_lo"] == pytest.approx(lo) and row["win_hi"] == pytest.approx(hi)


# ---------------------------------------------------------------------------------------- server faults


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    manifest = make_manifest(root, n=5)
    server = Server("--manifest", str(manifest), "--db", str(root / "answers.sqlite"))
    yield server, manifest, root
    server.stop()


def test_killed_server_loses_nothing(label_server, tmp_path):
    server, manifest, root = label_server
    ann = Annotator(server, "kill-test")
    state = ann.state()
    for label in ("good", "bad", "skip"):
        state = ann.answer(state["pos"], label=label)
    ann.answer(1, label="good")  # a relabel, then the server dies with no shutdown at all
    server.kill()
    server.start()
    ann2 = Annotator(server, "kill-test", secret=ann.secret)
    assert ann2.state()["progress"]["done"] == 3
    assert [ann2.state(p)["answer"] for p in range(3)] == ["good", "good", "skip"]
    out = tmp_path / "export.json"
    assert (
        main(
            [
                "label",
                "export",
                "--manifest",
                str(manifest),
                "--db",
                str(root / "answers.sqlite"),
                "--out",
                str(out),
                "--answers-csv",
                str(tmp_path / "a.csv"),
            ]
        )
        == 0
    )
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert len(rows) == 4 and all("kill-test" in r for r in rows[1:])


@pytest.mark.parametrize(
    "path",
    [
        "/api/image/../../../etc/passwd",
        "/api/image/..%2f..%2f..%2fetc%2fpasswd",
        "/api/image/%2e%2e/%2e%2e/etc/passwd",
        "/api/image//etc/passwd",
        "/api/image/%2Fetc%2Fpasswd",
        "/api/image/img/s0.png",
        "/api/image/../manifest.csv",
        "/static/../labeling_helpers.py",
        "/static/%2e%2e/app.py",
    ],
)
def test_path_traversal_refused(label_server, path):
    server = label_server[0]
    status, _, body = server.request("GET", path)
    assert status in (400, 404), (path, status)
    assert b"root:" not in body and b"import" not in body
    assert server.request("GET", "/api/image/i00000.png")[0] == 200


def test_annotator_sees_only_own_progress(label_server):
    server = label_server[0]
    alice = Annotator(server, "alice-private")
    alice.answer(alice.state()["pos"], label="bad")
    assert server.request("POST", "/api/session", {"name": "alice-private"})[0] == 403  # name is hers
    status, _ = Annotator(server, "mallory").call("GET", "/api/state")
    forged = server.request("GET", "/api/state", headers={"X-Annotator": "alice-private", "X-Session": "guess"})
    assert status == 200 and forged[0] == 403
    mallory = Annotator(server, "mallory2")
    state = mallory.state()
    assert state["answer"] is None and state["progress"]["done"] == 0
    assert server.request("GET", "/api/answers")[0] == 404 and server.request("GET", "/docs")[0] == 404


def test_concurrent_http_annotators(tmp_path):
    """Six annotators answer through one server at once: each image ends with exactly three answers."""
    server = Server("--manifest", str(make_manifest(tmp_path, n=5)))
    got, errors = {}, []

    def work(name):
        try:
            ann = Annotator(server, name)
            state, seen = ann.state(), []
            while not state["finished"]:
                seen.append(state["item"]["index"])
                state = ann.answer(state["pos"], label="skip")
            got[name] = seen
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"http{i}",)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    server.stop()
    assert not errors and all(len(s) == len(set(s)) for s in got.values())
    counts = np.bincount([i for s in got.values() for i in s], minlength=5)
    assert list(counts) == [3] * 5


def test_loopback_server_refuses_foreign_host_header(label_server):
    """On loopback there is no token, so a page elsewhere must not reach it by DNS rebinding."""
    server = label_server[0]
    assert server.request("GET", "/api/info", headers={"Host": "attacker.example"})[0] == 400
    assert server.request("GET", "/api/info", headers={"Host": f"localhost:{server.port}"})[0] == 200
    assert server.request("GET", "/api/info", headers={"Host": f"[::1]:{server.port}"})[0] == 200  # IPv6 loopback


def test_comparison_key_never_served(tmp_path):
    out, key = make_comparison(tmp_path, prompts=2)
    server = Server("--export", str(out))
    try:
        ann = Annotator(server, "k")
        bodies = [
            json.dumps(ann.state()),
            json.dumps(ann.answer(0, comparison={"alignment": "set1", "quality": "tie"})),
        ]
        bodies += [server.request("GET", p)[2].decode() for p in ("/", "/task", "/api/info", "/static/compare.js")]
        assert not any(r in b for b in bodies for r in ("clip", "reward", "q0001"))
        assert server.request("GET", "/api/image/../human_eval_key.csv")[0] == 400
        assert server.request("GET", "/api/image/human_eval_key.csv")[0] == 404
    finally:
        server.stop()


def _can_bind(host):
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def test_token_required_off_loopback(tmp_path):
    assert _can_bind("127.0.0.2"), "this test binds 127.0.0.2 (a loopback alias on Linux) as the off-loopback address"
    server = Server(
        "--manifest", str(make_manifest(tmp_path, n=2)), "--host", "127.0.0.2", env={"TN_RAY_LABEL_TOKEN": ""}
    )
    try:
        token = server.query.removeprefix("?token=")
        assert len(token) >= 24 and server.banner.count(token) == 1
        for path in ("/", "/api/info", "/api/image/i00000.png", "/static/label.js"):
            assert server.request("GET", path)[0] == 401  # no token
            assert server.request("GET", path + "?token=wrong")[0] == 401
            assert server.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert server.request("GET", path, headers={"Cookie": "tn_ray_label_token=wrong"})[0] == 401
        status, headers, _ = server.request("GET", f"/?token={token}")
        assert status == 303 and headers["location"] == "/" and "tn_ray_label_token=" in headers["set-cookie"]
        assert server.request("GET", "/api/info", headers={"Cookie": f"tn_ray_label_token={token}"})[0] == 200
        ann = Annotator(server, "remote", headers={"Authorization": f"Bearer {token}"})
        assert ann.answer(ann.state()["pos"], label="good")["progress"]["done"] == 1
    finally:
        server.stop()
