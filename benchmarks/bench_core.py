"""Speed of the core, side by side in one run: TopK vs Matryoshka steps, one-pass curve vs one FVU pass,
shrink's refit and merge vs encode passes.

    python benchmarks/bench_core.py [--d 576] [--n 16384] [--k 64] [--batch 4096] [--repeats 5]

Every timing is the median of `repeats` runs after one warm-up, on the same random batch (speed does not
depend on the data). Ratios are what to read: the machine's load moves all numbers together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from timing import timeit

from progsae import SAE, SAEConfig, TrainConfig, Trainer
from progsae.analysis import ProgressiveEval
from progsae.losses import fvu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import dense_code  # noqa: E402  (the plain dense twin, as a baseline)


class FixedBatch:
    def __init__(self, x):
        self.x, self.d_in = x, x.shape[1]

    def batches(self, batch_size, seed, start=0):
        while True:
            yield self.x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    d, N, k, B = a.d, a.n, a.k, a.batch
    torch.manual_seed(0)
    x = torch.randn(B, d)
    print(f"d={d} N={N} k={k} B={B}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")

    W = torch.randn(N, d) / d**0.5
    gemm = timeit(lambda: x @ W.t(), a.repeats)
    flops = 2 * B * d * N
    rate = flops / gemm
    print(f"\nfp32 matmul rate (x @ W_enc, the encoder GEMM): {rate / 1e9:.0f} GFLOP/s ({gemm * 1e3:.0f} ms)")

    def step_time(**kw):
        cfg = TrainConfig(d_sae=N, k=k, batch_size=B, tokens=B * 1000, warmup_steps=0, **kw)
        tr = Trainer(cfg, FixedBatch(x))
        return timeit(lambda: tr.train_step(x), a.repeats, warmup=3)  # the first steps fault in fresh memory

    topk = step_time()
    rows = [("TopK step", topk)]
    rows.append(("TopK step with AuxK (all latents dead)", step_time(dead_tokens=1)))
    rows.append(("Matryoshka step, fixed M = {N/4, N/2, N}", step_time(matryoshka=[N // 4, N // 2, N])))
    rows.append(("Matryoshka step, 8 sampled granularities", step_time(matryoshka_sampled=8)))

    sae = SAE(SAEConfig(d, N, k)).init_tied()
    opt = torch.optim.Adam(sae.parameters(), fused=True)

    def dense_step():  # the plain twin: dense B x N code, dense decode (what SAELens-style code does)
        z = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, k)
        loss = fvu(x, z @ sae.W_dec + sae.b_dec)
        opt.zero_grad()
        loss.backward()
        opt.step()

    rows.append(("dense reference step (dense code, dense decode)", timeit(dense_step, max(1, a.repeats // 2))))
    print(f"\n{'training step':<52}{'ms':>8}{'tokens/s':>10}{'vs TopK':>9}{'of matmul rate':>16}")
    for name, t in rows:
        print(f"{name:<52}{t * 1e3:>8.0f}{B / t:>10.0f}{t / topk:>8.2f}x{flops / t / rate:>15.0%}")

    sae.eval()

    @torch.no_grad()
    def full_fvu_pass():
        return fvu(x, sae(x))

    def curve_pass():
        acc = ProgressiveEval(sae)
        acc.update(x)
        return acc.result()

    one = timeit(full_fvu_pass, a.repeats)
    curve = timeit(curve_pass, a.repeats)
    print(f"\n{'evaluation':<52}{'ms':>8}{'ratio':>10}")
    print(f"{'one full-size FVU pass (encode + decode)':<52}{one * 1e3:>8.0f}{1:>9.2f}x")
    print(f"{'one-pass FVU curve at every G = 1..N':<52}{curve * 1e3:>8.0f}{curve / one:>9.2f}x")

    # latent records (the browser's and auto-interp's data) against one encode of the same tokens, streaming:
    # the records' kept entries are full after the first batches, so a timed update merges into full state
    from progsae.interp.records import RecordsPass

    @torch.no_grad()
    def encode_pass():
        return sae.encode(x)

    records = RecordsPass(sae)
    for _ in range(3):
        records.update(x)
    enc, rec = timeit(encode_pass, a.repeats), timeit(lambda: records.update(x), a.repeats)
    print(f"{'encode only':<52}{enc * 1e3:>8.0f}{enc / one:>9.2f}x")
    print(f"{'latent records pass (top 20, sample 40, histogram)':<52}{rec * 1e3:>8.0f}{rec / one:>9.2f}x"
          f"   {rec / enc:.2f}x the encode")  # fmt: skip

    # shrink's refit (N -> N/4, k/4) on 1M tokens against one encode of the same 1M tokens by the large SAE:
    # per batch the small SAE's encode and the normal equations, then one least-squares solve
    from progsae.analysis.shrink import normal_equations, refit

    small = sae.truncate(N // 4)
    accumulate = timeit(lambda: normal_equations(small, [x]), a.repeats)
    solve = timeit(lambda: refit(small, [x]), 1, warmup=0) - accumulate
    batches = 1_000_000 / B
    ratio = (batches * accumulate + solve) / (batches * enc)
    print(f"{'shrink refit N -> N/4: normal equations per batch':<52}{accumulate * 1e3:>8.0f}{accumulate / one:>9.2f}x"
          f"   {accumulate / enc:.2f}x the encode")  # fmt: skip
    print(f"{'shrink refit: the least-squares solve, once':<52}{solve * 1e3:>8.0f}")
    print(f"refit of 1M tokens = {ratio:.2f} encode passes of the N-latent SAE over the same tokens")
    from progsae.analysis.shrink import merge

    grouping = timeit(lambda: merge(sae, N // 4, torch.rand(N, generator=torch.Generator().manual_seed(0))), 1, warmup=0)
    print(f"{'shrink merge N -> N/4: the grouping, once':<52}{grouping * 1e3:>8.0f}")
    print(f"merge of 1M tokens (grouping, then refit) = {(grouping + batches * accumulate + solve) / (batches * enc):.2f} "
          "encode passes")  # fmt: skip

    # a JumpReLU SAE of the same weights, its one threshold set so that the mean L0 is ~k (pretrained SAEs)
    jr = SAE(SAEConfig(d, N, None, architecture="jumprelu"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(jr, name).copy_(getattr(sae, name))
        pre = (x[:512] - sae.b_dec) @ sae.W_enc + sae.b_enc
        jr.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - 512 * k).values))
        l0 = float((jr.encode(x).values > 0).sum(1).float().mean())
    sae, saved = jr, sae
    one_jr, curve_jr = timeit(full_fvu_pass, a.repeats), timeit(curve_pass, a.repeats)
    sae = saved
    print(f"{f'JumpReLU FVU pass (same weights, mean L0 {l0:.0f})':<52}{one_jr * 1e3:>8.0f}{one_jr / one:>9.2f}x")
    print(f"{'JumpReLU one-pass FVU curve at every G':<52}{curve_jr * 1e3:>8.0f}{curve_jr / one:>9.2f}x")


if __name__ == "__main__":
    main()
