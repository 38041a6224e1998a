"""The optimizer benchmark's own instruments: the collective byte counter, the
Newton-Schulz accounting and the state-byte measurement, on real gloo processes."""

from __future__ import annotations

import pytest
import torch

from muon_megatron.runtime.launch import spawn
from muon_megatron.tools import cli
from muon_megatron.tools.bench import BenchConfig, run_bench

WORLD = 3
BF16_PARAMS = True  # the small benchmark's params: bf16, with fp32 main params
# Optimizer state, per element of a main-param shard (Megatron's mixed precision keeps an
# fp32 main copy of bf16 params; of fp32 params the main param is the param itself).
FP32_BYTES = torch.finfo(torch.float32).bits // 8
MAIN_PARAM_BYTES = FP32_BYTES if BF16_PARAMS else 0
MUON_BYTES = MAIN_PARAM_BYTES + FP32_BYTES  # + fp32 momentum (stored as exp_avg)
ADAMW_BYTES = MAIN_PARAM_BYTES + 2 * FP32_BYTES  # + exp_avg + exp_avg_sq
# torch's Adam keeps one fp32 scalar `step` tensor per param it steps: per shard, not per
# element; Muon shards have no gradient when the inner AdamW runs, so they get none.
ADAM_STEP_BYTES_PER_SHARD = FP32_BYTES


def _counted_collectives(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer

    from muon_megatron.tools.comm_counter import CollectiveCounter

    originals = (dist.all_reduce, param_and_grad_buffer.dist_all_gather_func)
    counter = CollectiveCounter()
    out: dict = {}
    with counter.installed():
        # Rank r sends r + 2j + 1 fp32 elements to rank j: uneven in both directions.
        in_splits = [rank + 2 * j + 1 for j in range(world)]
        out_splits = [j + 2 * rank + 1 for j in range(world)]
        send = torch.full((sum(in_splits),), float(rank))
        recv = torch.empty(sum(out_splits))
        counter.start()
        dist.all_to_all_single(recv, send, out_splits, in_splits)
        out["a2a"] = counter.totals(counter.stop())
        out["a2a_recv_ok"] = recv.tolist() == [
            float(j) for j in range(world) for _ in range(out_splits[j])]

        gathered = torch.empty(10 * world, dtype=torch.bfloat16)
        counter.start()
        # megatron's module-level alias of all_gather_into_tensor, bound at import time.
        param_and_grad_buffer.dist_all_gather_func(gathered, torch.ones(10, dtype=torch.bfloat16))
        dist._all_gather_base(gathered, torch.ones(10, dtype=torch.bfloat16))  # nested in torch
        out["all_gather"] = counter.totals(counter.stop())

        counter.start()
        dist.reduce_scatter_tensor(torch.empty(5), torch.ones(5 * world))
        dist.all_reduce(torch.ones(6, dtype=torch.float64))
        dist.broadcast(torch.ones(7), src=1)
        out["mixed"] = counter.totals(counter.stop())

        before = len(counter.records)
        dist.all_reduce(torch.ones(100))  # outside a window: not counted
        out["outside"] = len(counter.records) - before
    out["restored"] = (dist.all_reduce, param_and_grad_buffer.dist_all_gather_func) == originals
    return out


@pytest.fixture(scope="module")
def counted() -> list[dict]:
    return spawn(_counted_collectives, WORLD)


def test_all_to_all_single_bytes_exclude_the_self_split(counted: list[dict]) -> None:
    for r, out in enumerate(counted):
        assert out["a2a_recv_ok"]
        sent = 4 * sum(r + 2 * j + 1 for j in range(WORLD) if j != r)
        received = 4 * sum(j + 2 * r + 1 for j in range(WORLD) if j != r)
        assert (out["a2a"]["sent"], out["a2a"]["received"]) == (sent, received)
        assert out["a2a"]["by_op"]["all_to_all_single"]["calls"] == 1


def test_all_gather_through_megatron_alias_and_nested_base_counted_once_each(
    counted: list[dict],
) -> None:
    for out in counted:
        ag = out["all_gather"]
        # Two calls of (W-1) x 20 bytes each; _all_gather_base's inner call is not counted.
        assert ag["sent"] == ag["received"] == 2 * (WORLD - 1) * 20
        assert sum(op["calls"] for op in ag["by_op"].values()) == 2


def test_reduce_scatter_all_reduce_broadcast_bytes(counted: list[dict]) -> None:
    for r, out in enumerate(counted):
        by_op = out["mixed"]["by_op"]
        assert by_op["reduce_scatter_tensor"]["sent"] == (WORLD - 1) * 20
        assert by_op["all_reduce"]["sent"] == by_op["all_reduce"]["received"] == 2 * 2 * 48 // 3
        bcast = by_op["broadcast"]
        expected = ((WORLD - 1) * 28, 0) if r == 1 else (0, 28)
        assert (bcast["sent"], bcast["received"]) == expected
        assert out["outside"] == 0
        assert out["restored"]


@pytest.fixture(scope="module")
def small_bench() -> dict:
    from muon_megatron.testing.tiny import ModelSpec

    model = ModelSpec(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, moe_ffn_hidden_size=64, seq_length=32, bf16=BF16_PARAMS,
    )
    cfg = BenchConfig(
        layouts=("tp2xdp2", "moe_ep2xdp2"), optimizers=("adamw", "muon", "muon_fp32comm"),
        model=model, num_experts=4, warmup=1, steps=1,
    )
    return run_bench(cfg)


def test_newton_schulz_runs_one_copy_of_every_logical_matrix(small_bench: dict) -> None:
    muon_rows = [r for r in small_bench["rows"] if r["optimizer"] != "adamw"]
    assert len(muon_rows) == 4
    for row in muon_rows:
        # FLOPs from the shapes passed to newton_schulz / the spec's own tally of matrices.
        assert row["ns_copies"] == pytest.approx(1.0, rel=1e-12), row["layout"]
        assert row["ns_flops_measured_equals_planned"]
        assert row["ns_count_check"], (row["ns_matrices_per_step"],
                                       row["ns_expected_matrices"])
    assert small_bench["checks"]["ns_copies"]["ok"]


def test_state_bytes_and_communication_are_what_the_scheme_says(small_bench: dict) -> None:
    rows = {(r["layout"], r["optimizer"]): r for r in small_bench["rows"]}
    for layout in ("tp2xdp2", "moe_ep2xdp2"):
        adam, bf16, fp32 = (rows[layout, o] for o in ("adamw", "muon", "muon_fp32comm"))
        assert bf16["state_bytes_per_muon_param"] == MUON_BYTES
        for row in (adam, bf16):  # the AdamW params of either optimizer
            numel, shards = row["state_adamw_numel"], row["state_adamw_shards"]
            expected = ADAMW_BYTES * numel + ADAM_STEP_BYTES_PER_SHARD * shards
            assert row["state_bytes_per_adamw_param"] == expected / numel, (layout, row["optimizer"])
        for row in (adam, bf16, fp32):
            assert row["bytes_constant_over_steps"]
        # Muon adds only its point-to-point exchanges (and two small all-reduces); fp32
        # doubles them.
        sent_bf16 = [ops["isend"]["sent"] for ops in bf16["by_op"]]
        sent_fp32 = [ops["isend"]["sent"] for ops in fp32["by_op"]]
        assert sent_fp32 == [2 * x for x in sent_bf16]
        received = [ops["irecv"]["received"] for ops in bf16["by_op"]]
        assert sum(sent_bf16) == sum(received) > 0
        # Every shard crosses the wire at most once each way, 2 bytes per element in bf16.
        assert sum(sent_bf16) <= 2 * 2 * sum(bf16["muon_shard_numel"])
        assert all("isend" not in ops and "irecv" not in ops for ops in adam["by_op"])


def test_cli_has_the_bench_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--layouts" in capsys.readouterr().out
