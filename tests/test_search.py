"""python -m magjax.search: 1:N identification against an independent NumPy ranking (float64), the
threshold at a target FAR against a direct count, TPIR@FPIR against a hand computation."""

import csv
import itertools
import json

import numpy as np
import pytest

from magjax import search


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_gallery(seed=0, identities=40, dim=16):
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"id{i:02d}" for i in range(identities)], rng.integers(1, 5, identities))
    centres = {name: rng.normal(size=dim) for name in np.unique(ids)}
    emb = np.stack([centres[name] + 0.8 * rng.normal(size=dim) for name in ids])
    return unit(emb).astype(np.float32), ids, centres


def test_ranking_matches_numpy_float64():
    emb, ids, centres = random_gallery()
    rng = np.random.default_rng(1)
    truth = rng.choice(sorted(centres) + ["stranger"] * 5, 60)
    probes = unit([centres.get(t, rng.normal(size=16)) + rng.normal(size=16) for t in truth])
    names, templates = search.templates(emb, ids)
    index, score, rank = search.search(
        probes.astype(np.float32),
        templates,
        5,
        np.array([list(names).index(t) if t in names else -1 for t in truth]),
    )

    # independent: per identity a Python loop, float64 throughout, a full argsort
    ref_names = sorted(set(ids))
    ref = np.stack(
        [
            unit(np.mean([unit(e) for e, i in zip(emb, ids, strict=True) if i == n], axis=0))
            for n in ref_names
        ]
    )
    scores = probes @ ref.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert list(names) == ref_names
    np.testing.assert_array_equal(index, order)
    np.testing.assert_allclose(score, np.take_along_axis(scores, order, 1), atol=1e-6)
    for p, t in enumerate(truth):
        want = 0 if t not in ref_names else 1 + np.sum(scores[p] > scores[p, ref_names.index(t)])
        assert rank[p] == want
    assert 0 < np.mean(rank[rank > 0] == 1) < 1  # neither trivial nor hopeless


def test_top_k_larger_than_gallery_and_ties():
    templates = unit(np.eye(3)).astype(np.float32)
    probes = unit([[1, 1, 0], [0, 0, 1]]).astype(np.float32)
    index, score = search.search(probes, templates, 10)
    assert index.tolist() == [[0, 1, 2], [2, 0, 1]]  # a tie keeps the gallery order
    np.testing.assert_allclose(score[0], [2**-0.5, 2**-0.5, 0], atol=1e-7)


@pytest.mark.parametrize("far", [1e-3, 0.01, 0.1, 0.29])
def test_threshold_at_far_matches_a_direct_count(far, monkeypatch):
    emb, ids, _ = random_gallery(seed=2, identities=30, dim=8)
    monkeypatch.setattr(search, "_block_rows", lambda columns: 7)  # several merged blocks
    got = search.verification_threshold(emb, ids, far)

    # direct: every pair i < j in float64
    e = emb.astype(np.float64)
    pairs = list(itertools.combinations(range(len(e)), 2))
    impostor = np.sort([e[i] @ e[j] for i, j in pairs if ids[i] != ids[j]])[::-1]
    genuine = np.array([e[i] @ e[j] for i, j in pairs if ids[i] == ids[j]])
    k = int(np.floor(far * len(impostor) + 1e-9))
    assert got["impostor_pairs"] == len(impostor) and got["genuine_pairs"] == len(genuine)
    t = got["threshold"]
    # exactly k impostors pass: t lies between the k-th and the (k+1)-th largest score
    assert impostor[k] < t and (k == 0 or impostor[k - 1] >= t)
    assert abs(t - impostor[k]) < 1e-6  # and it is the smallest such threshold
    assert got["far"] == pytest.approx(k / len(impostor))
    assert got["far"] <= far
    assert got["tar"] == pytest.approx(np.mean(genuine >= t))


def test_threshold_at_rate_edge_cases():
    s = np.array([0.9, 0.5, 0.5, 0.1], np.float32)
    assert search.threshold_at_rate(s, 0.1) == np.nextafter(np.float32(0.9), np.float32(1))
    # k = 1, but the second and third tie: the threshold passes only the first (FPIR 0.25)
    assert search.threshold_at_rate(s, 0.5) == np.nextafter(np.float32(0.5), np.float32(1))
    assert search.threshold_at_rate(s, 0.75) == np.nextafter(np.float32(0.1), np.float32(1))
    assert search.threshold_at_rate(s, 1.0) == float("-inf")
    # 0.29 * 100 is 28.999999999999996: 29 may pass
    many = np.arange(100, dtype=np.float32)[::-1]
    assert search.threshold_at_rate(many, 0.29) == np.nextafter(np.float32(70), np.float32(71))


def hand_case():
    """Gallery A, B, C (orthonormal); probes with set cosines (the rest of each probe along a
    fourth axis). Mated: a (A 0.9), b (B 0.6), c (A 0.7 above its own C 0.5: rank 2), d (C 0.4).
    Non-mated (Z): best scores 0.8, 0.5, 0.45, 0.3, 0.2."""
    e = np.eye(4)

    def probe(**cos):
        v = sum(c * e["ABC".index(k)] for k, c in cos.items())
        return v + np.sqrt(1 - np.sum(np.square(list(cos.values())))) * e[3]

    probes = np.stack(
        [
            probe(A=0.9),
            probe(B=0.6),
            probe(A=0.7, C=0.5),
            probe(C=0.4),
            probe(B=0.8),
            probe(A=0.5),
            probe(C=0.45),
            probe(A=0.3),
            probe(B=0.2),
        ]
    )
    truth = ["A", "B", "C", "C", "Z", "Z", "Z", "Z", "Z"]
    return e[:3].astype(np.float32), np.array(["A", "B", "C"]), probes.astype(np.float32), truth


def test_tpir_at_fpir_by_hand():
    gallery, ids, probes, truth = hand_case()
    names, templates = search.templates(gallery, ids)
    true_index = np.array([list(names).index(t) if t in names else -1 for t in truth])
    _, score, rank = search.search(probes, templates, 3, true_index)
    assert rank.tolist() == [1, 1, 2, 1, 0, 0, 0, 0, 0]
    report = search.identification_report(score[:, 0], rank, true_index >= 0, (0.1, 0.2, 0.5))
    assert (report["mated"], report["non_mated"]) == (4, 5)
    assert report["rank1"] == 0.75 and report["rank5"] == 1.0
    by_fpir = report["tpir_at_fpir"]
    # FPIR 0.1 of 5: no non-mated may pass, t just above 0.8: only a (0.9)
    assert by_fpir["0.1"]["tpir"] == 0.25 and by_fpir["0.1"]["fpir_reached"] == 0.0
    # FPIR 0.2: one may pass (0.8), t just above 0.5: a and b (c is not at rank 1)
    assert by_fpir["0.2"]["tpir"] == 0.5 and by_fpir["0.2"]["fpir_reached"] == 0.2
    assert by_fpir["0.2"]["threshold"] == pytest.approx(0.5, abs=1e-6)
    # FPIR 0.5: two pass (0.8, 0.5), t just above 0.45: still a and b, d's 0.4 stays out
    assert by_fpir["0.5"]["tpir"] == 0.5 and by_fpir["0.5"]["fpir_reached"] == 0.4


def _save(path, emb, paths, **extra):
    np.savez(path, embeddings=np.asarray(emb, np.float32), paths=np.asarray(paths), **extra)


def test_search_cli(tmp_path, capsys):
    gallery, ids, probes, truth = hand_case()
    _save(
        tmp_path / "g.npz",
        2.5 * gallery,  # not unit length: search normalises
        [f"people/{i}/{n}.jpg" for n, i in enumerate(ids)],
    )
    boxes = np.arange(36, dtype=np.float32).reshape(9, 4)
    _save(
        tmp_path / "p.npz",
        probes,
        [f"photos/{t}/{n}.jpg" for n, t in enumerate(truth)],
        boxes=boxes,
    )
    base = ["--gallery", str(tmp_path / "g.npz"), "--probes", str(tmp_path / "p.npz")]
    assert search.main([*base, "--threshold", "0.55", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "photos/A/0.jpg [0,1,2,3]: A  (A 0.900, B 0.000)"
    assert lines[3] == "photos/C/3.jpg [12,13,14,15]: unknown  (C 0.400, A 0.000)"
    assert lines[-1] == "9 probes against 3 identities: 4 identified, 5 unknown (threshold 0.5500)"

    out = tmp_path / "res" / "matches.csv"
    assert (
        search.main(
            [
                *base,
                "--threshold",
                "0.55",
                "--out",
                str(out),
                "--probe-ids",
                "folders",
                "--fpir",
                "0.2",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["report"]["rank1"] == 0.75
    assert summary["report"]["tpir_at_fpir"]["0.2"]["tpir"] == 0.5
    rows = list(csv.DictReader(out.open()))
    assert [r["decision"] for r in rows] == [
        "A",
        "B",
        "A",
        "unknown",
        "B",
        "unknown",
        "unknown",
        "unknown",
        "unknown",
    ]
    assert rows[2]["identity_2"] == "C" and float(rows[2]["score_2"]) == pytest.approx(0.5)
    assert rows[1]["x1"] == "4.0" and rows[1]["path"] == "photos/B/1.jpg"

    # identities from a list file; the threshold from a verification set at a target FAR
    (tmp_path / "ids.txt").write_text("\n".join(truth) + "\n")
    emb, vids, _ = random_gallery(seed=3, identities=12, dim=4)
    _save(tmp_path / "v.npz", emb, [f"v/{i}/x.jpg" for i in vids])
    assert (
        search.main(
            [
                *base,
                "--probe-ids",
                str(tmp_path / "ids.txt"),
                "--verification",
                str(tmp_path / "v.npz"),
                "--far",
                "0.01",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    want = search.verification_threshold(emb, vids, 0.01)
    assert summary["threshold"] == want["threshold"]
    assert summary["verification"]["impostor_pairs"] == want["impostor_pairs"]
    assert summary["report"]["rank1"] == 0.75
    assert summary["identified"] == int(
        np.sum(np.sort(probes @ gallery.T, 1)[:, -1] >= want["threshold"])
    )


@pytest.mark.parametrize(
    "case, message",
    [
        (["--threshold", "0.3", "--far", "0.1"], "give --threshold, or --verification with --far"),
        (["--far", "0.1"], "--verification and --far go together"),
        (["--threshold", "3"], "--threshold is a cosine similarity in [-1, 1], got 3.0"),
        (["--verification", "v.npz", "--far", "2"], "must be a rate in (0, 1), got 2"),
        (["--probe-ids", "ids.txt"], "ids.txt: 2 identities for the 9 rows of the probe features"),
        (["--gallery-ids", "nothere.txt"], "gallery nothere.txt: no such identity list"),
        (["--probes", "small.npz"], "small.npz: embeddings of dimension 3, the gallery's"),
        (["--probes", "junk.npz"], "junk.npz: not a feature file"),
        (["--probes", "none.npz"], "none.npz: no such feature file"),
    ],
)
def test_search_errors_are_one_line(tmp_path, capsys, monkeypatch, case, message):
    gallery, ids, probes, _ = hand_case()
    monkeypatch.chdir(tmp_path)
    _save("g.npz", gallery, [f"people/{i}/x.jpg" for i in ids])
    _save("p.npz", probes, ["p.jpg"] * 9)
    _save("small.npz", probes[:, :3], ["p.jpg"] * 9)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "ids.txt").write_text("A\nB\n")
    argv = ["--gallery", "g.npz", "--probes", "p.npz"]
    for flag in ("--probes", "--gallery"):
        if flag in case:  # replaces the default
            i = argv.index(flag)
            argv[i : i + 2] = []
    try:
        code = search.main([*argv, *case])
    except SystemExit as e:  # argparse's errors (magjax.cli.ArgumentParser: one line too)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_a_failed_csv_write_leaves_the_previous_file(tmp_path):
    """The results CSV is written whole or not at all (magjax.files)."""
    out = tmp_path / "results.csv"
    out.write_text("previous\n")
    good = {
        "probe": 0,
        "path": "a.jpg",
        "box": None,
        "decision": "id00",
        "candidates": [("id00", 0.9)],
    }
    bad = {**good, "probe": 1, "box": "not a box"}  # fails after the header and the first row
    with pytest.raises(ValueError):
        search._write_csv(out, [good, bad], 1)
    assert out.read_text() == "previous\n"
    assert [path.name for path in tmp_path.iterdir()] == ["results.csv"]
    search._write_csv(out, [good], 1)
    assert list(csv.reader(out.open())) == [
        ["probe", "path", "x1", "y1", "x2", "y2", "decision", "identity_1", "score_1"],
        ["0", "a.jpg", "", "", "", "", "id00", "id00", "0.900000"],
    ]
