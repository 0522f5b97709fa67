"""``python -m magjax.bench head``: the Partial FC step with a sampled-rows gradient
(``--freeze-unsampled``) compiles without the dense centre gradient."""

import json

from magjax.bench import head as head_bench

CLASSES, DIM = 40_000, 64


def _bytes(capsys, *extra):
    argv = ["--abstract", "--batch", "64", "--classes", str(CLASSES), "--dim", str(DIM),
            "--sample-rate", "0.1", *extra]
    assert head_bench.main(argv) in (0, None)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bytes_per_device"]


def test_sampled_rows_step_has_no_dense_centre_gradient(capsys):
    dense, rows = _bytes(capsys), _bytes(capsys, "--freeze-unsampled")
    centre_array = CLASSES * DIM * 4
    # Both hold the [C, d] centres as an argument; the dense step also outputs a [C, d]
    # gradient, the sampled-rows step a [C/10, d] one.
    assert dense - rows >= 0.8 * centre_array, (dense, rows)
