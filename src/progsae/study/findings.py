"""The paper's findings beside a run's, each with a verdict decided by a stated rule.

Comparisons (Matryoshka against the permuted vanilla SAE; a truncated large SAE against a native one) are
made per G with the difference's 95% interval (aggregate.py), in both truncation modes: rescaled (the
paper's; L0 matched by construction, k_G = k G / N latents for every SAE) and prefix (the same G, each SAE
at its own L0; for FVU also read at matched L0, each prefix curve where its L0 equals the lower of the two).
The rule, per mode: "reproduced" when the paper's side is better at every compared G with an interval that
excludes the reverse; "not reproduced" when it is better for certain at none; "partly reproduced"
otherwise. A finding is "reproduced" only when the rule holds in both modes; "partly reproduced" names the
mode that holds. A fixed-granularity Matryoshka is judged only at the granularities it was trained for.

Every verdict also says what limits it: SAEs whose training had not converged (results.py `convergence`),
and for the power law a full-window fit below the R² the rule asks of the robust window.
"""

from __future__ import annotations

from ..analysis.aggregate import Aggregate
from ..analysis.compare import matched_l0
from ..interp.bands import JUDGE_MIN, difference

PAPER_EXPONENTS = (-1.27, -0.54)
R2_MIN = 0.9  # the power law's rule: every fit at least this good


def _num(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _cmp(c: dict) -> str:
    ci = f", 95% [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c["ci"] else ", no interval"
    return f"G={c['G']}: {_num(c['a'])} vs {_num(c['b'])} (Δ {c['diff']:+.3f}{ci})"


def _verdict(cmps: list[dict]) -> str:
    if cmps and all(c["ci"] is None for c in cmps):
        return "undecided (no interval)"
    certain = sum(c["certain"] for c in cmps)
    if cmps and certain == len(cmps):
        return "reproduced"
    return "not reproduced" if certain == 0 else "partly reproduced"


def _modes(by_mode: dict[str, list[dict]]) -> str:
    """The rule over the truncation modes compared (those the SAEs have): reproduced only when it holds in
    every mode; otherwise each mode's own verdict, so the reader sees which holds."""
    v = {m: _verdict(c) if c else "undecided (nothing compared)" for m, c in by_mode.items()}
    if len(set(v.values())) <= 1:
        return next(iter(v.values()), "undecided (nothing compared)")
    each = "; ".join(f"{m} mode: {x}" for m, x in v.items())
    none = all(x == "not reproduced" or x.startswith("undecided") for x in v.values())
    return f"{'not' if none else 'partly'} reproduced ({each})"


def not_converged(res: dict, plan, names) -> str:
    """"; not converged: ..." for the trained SAEs behind `names` (a sorted copy: its base) whose training had
    not converged (results.py `convergence`), else "": their names, and how fast their FVU still fell (one
    SAE's rate, or the range over several)."""
    falling, short = {}, []
    for n in dict.fromkeys(plan[n].base or n for n in names):
        t = res["training"].get(n)
        if t is None or t["converged"]:
            continue
        if t["fvu_per_doubling"] is None:
            short.append(f"{n} (history too short to tell)")
        else:
            falling[n] = -t["fvu_per_doubling"] / t["final_fvu"]
    parts = short
    if falling:
        lo, hi = min(falling.values()), max(falling.values())
        rate = f"{lo:.1%}" if len(falling) == 1 else f"{lo:.0%}-{hi:.0%}"
        parts = [f"{', '.join(falling)} (FVU still falling {rate} of its value per doubling of tokens)", *short]
    return f"; not converged: {', '.join(parts)}" if parts else ""


def power_law_finding(power_laws: dict) -> dict:
    fits = {n: f["e_z2"] for n, f in power_laws.items()}
    full, robust = [f["full"] for f in fits.values()], [f["robust"] for f in fits.values()]

    def span(fs, k):
        return f"{min(f[k] for f in fs):.2f} to {max(f[k] for f in fs):.2f}"

    lo, hi = PAPER_EXPONENTS
    in_range = all(lo <= f["exponent"] <= hi for f in robust)
    fits_well = min(f["r2"] for f in robust) >= R2_MIN
    full_low = min(f["r2"] for f in full) < R2_MIN
    starts = sorted({f["lo"] for f in robust})
    starts = f"from rank {starts[0]}" if len(starts) == 1 else f"starting at rank {starts[0]} to {starts[-1]}, by SAE,"
    return {
        "paper": "E[z²] of vanilla SAE latents follows a power law in rank: exponents -0.54 to -1.27, R² 0.916-0.922",
        "ours": f"robust window ({starts} up to N/2, after the outlier latents): exponents "
        f"{span(robust, 'exponent')}, R² {span(robust, 'r2')}; full window (ranks 1..N/2): exponents "
        f"{span(full, 'exponent')}, R² {span(full, 'r2')} ({len(fits)} SAEs)",
        "verdict": ("reproduced" if in_range and fits_well else "partly reproduced" if in_range or fits_well
                    else "not reproduced")
        + (f"; over the full window (ranks 1..N/2) R² as low as {min(f['r2'] for f in full):.2f}, below {R2_MIN}"
           if full_low else ""),  # fmt: skip
        "rule": f"robust-window exponents inside the paper's range and R² ≥ {R2_MIN} for every vanilla SAE; the "
        "verdict says when the full window falls below that R²",
    }


def _sizes(gs: list[int], N: int) -> str:
    return ", ".join("N" if g == N else f"N/{N // g}" if N % g == 0 else str(g) for g in gs)


def _side(cmps: list[dict]) -> str:
    return (f"better for certain at {sum(c['certain'] for c in cmps)} of {len(cmps)} G, worse for certain at "
            f"{sum(c['worse_certain'] for c in cmps)} — " + "; ".join(_cmp(c) for c in cmps))  # fmt: skip


def matryoshka_findings(agg: Aggregate, res: dict, plan) -> list[dict]:
    out, N = [], plan.N
    perm = plan.vanilla("e_z2")
    grid = [g for g in res["grid"] if g < N]
    families = plan.families()
    variants = {  # each Matryoshka family: judged at the granularities it was trained for (sampled: every G)
        n: (f"fixed M = {_sizes(m, N)}", [g for g in m if g < N]) if (m := plan[n].granularities) else ("sampled", grid)
        for n in plan.names("matryoshka")
        if plan[n].seed == 0
    }
    curves = res["curves"]
    for metric, key, higher in (
        ("FVU", "fvu", False),
        ("recaptured LM loss", "recaptured", True),
        ("RSA", "rsa", True),
    ):
        for fam, (what, trained) in variants.items():
            if fam not in agg.families:
                continue
            by_mode = {m: [c for G in trained if (c := agg.compare(fam, perm, key, m, G, higher))]
                       for m in ("rescaled", "prefix")}  # fmt: skip
            if not by_mode["rescaled"] and not by_mode["prefix"]:
                continue
            l0s = {G: (agg.point(fam, "l0", "prefix", G), agg.point(perm, "l0", "prefix", G)) for G in trained}
            ours = [f"{fam} ({what}) vs {perm}, rescaled mode (L0 = k·G/N for both): {_side(by_mode['rescaled'])}"]
            if by_mode["prefix"]:
                ours.append("prefix mode (same G; L0 " + ", ".join(f"{l0s[c['G']][0]:.1f} vs {l0s[c['G']][1]:.1f}"
                            for c in by_mode["prefix"]) + f"): {_side(by_mode['prefix'])}")  # fmt: skip
            verdict = _modes(by_mode)
            if key == "fvu":
                m = [matched_l0(curves[fam], curves[perm], G) for G in trained]
                m = [x for x in m if x["fvu_a"] is not None and x["fvu_b"] is not None]
                wins = sum(x["fvu_a"] < x["fvu_b"] for x in m)
                ours.append(
                    "prefix mode at matched L0 (each prefix curve read at the G where its L0 equals the lower of "
                    f"the two L0s at that G; no interval): better at {wins} of {len(m)} ("
                    + ", ".join(f"G={x['G']}, L0 {x['l0']:.1f}: {x['fvu_a']:.3f} vs {x['fvu_b']:.3f}" for x in m)
                    + ")"
                )
                if m and 2 * wins < len(m) and not verdict.startswith("not"):
                    verdict += f"; at matched L0 in prefix mode better at only {wins} of {len(m)} G"
            untrained = [G for G in grid if G not in trained]
            note = f" Not judged at G = {', '.join(map(str, untrained))}, which it was not trained for." if untrained else ""
            saes = families[fam] + families[plan[perm].family]
            out.append(
                {
                    "paper": f"Matryoshka SAEs beat permuted vanilla SAEs on {metric} (K/G constant)",
                    "ours": ". ".join(ours) + f".{note}",
                    "verdict": verdict + not_converged(res, plan, saes),
                    "rule": "in each truncation mode, every trained G < N with the interval of the difference "
                    "excluding the reverse; reproduced only when that holds in both modes, partly when it holds "
                    "somewhere (each mode's verdict named); FVU verdicts also say when prefix mode at matched L0 "
                    "disagrees",
                }
            )
    return out


def splitting_finding(agg: Aggregate, res: dict, plan) -> dict:
    big = plan.vanilla("e_z2")
    native = {plan[n].d_sae: n for n in plan.names("native") if plan[n].seed == 0}
    by_mode = {
        m: [c for f in res["feature_splitting"] if (c := agg.compare(big, native[f["G"]], "fvu", m, f["G"], False))]
        for m in ("rescaled", "prefix")
    }
    worse = {m: [dict(c, certain=c["worse_certain"]) for c in cs] for m, cs in by_mode.items()}  # the paper's side
    fs = {f["G"]: f for f in res["feature_splitting"]}
    match = "; ".join(
        f"G={g}: {fs[g]['matched_0.9']:.1%} of native directions match one of the first G latents with cosine > 0.9, "
        f"{fs[g]['matched_0.9_all_N']:.1%} one of all N"
        for g in sorted(fs)
    )
    families = plan.families()
    saes = [n for g in fs for n in families[plan[native[g]].family]] + families[plan[big].family]
    return {
        "paper": "A large SAE truncated to G underperforms a native G-latent SAE (65K truncated to 16K is worse than native 16K)",
        "ours": f"{plan.vanilla()} by E[z²] truncated vs native, FVU in rescaled mode (same L0): "
        + "; ".join(_cmp(c) for c in by_mode["rescaled"])
        + ". Prefix mode (the truncated SAE at its own L0): "
        + "; ".join(_cmp(c) for c in by_mode["prefix"])
        + f". Decoder matches: {match}",
        "verdict": _modes(worse) + not_converged(res, plan, saes),
        "rule": "truncated FVU above native at every G with the interval excluding the reverse, in each truncation "
        "mode; reproduced only when that holds in both",
    }


def findings(agg: Aggregate, res: dict, plan) -> list[dict]:
    """The paper's reported findings beside ours, each with its verdict and the rule that decided it."""
    vanilla = {n: f for n, f in res["power_laws"].items() if res["saes"][n]["role"] in ("vanilla", "native")}
    power = power_law_finding(vanilla)
    power["verdict"] += not_converged(res, plan, vanilla)
    return [power, *matryoshka_findings(agg, res, plan), splitting_finding(agg, res, plan)]


def _sims(scores: list[dict], lo: int = 0, hi: int | None = None) -> list:
    return [s["simulation"] for s in scores if lo <= s["latent"] and (hi is None or s["latent"] < hi)]


def interpretability_findings(study: dict, vanilla: str, matryoshkas: list[str], N: int, check: dict,
                              n_boot: int = 1000, seed: int = 0, lexical: dict | None = None) -> list[dict]:
    """The paper's two interpretability findings with verdicts (interp/bands.py: the differences), decided by the
    run's judge when it passes its own check (simulation at least JUDGE_MIN on known-word latents), else by the
    lexical judge when it passes (`lexical`: {"judge", "check", "saes"}, results.json's; a weaker, lexical
    notion, named in the verdict), else undecided; study: name -> {"scores": [...]}."""
    judges = [(f"judge {check.get('judge', '?')}", check, study)]
    if lexical:
        judges.append(("the lexical judge", lexical["check"], lexical["saes"]))
    checks = ", ".join(f"{n} {'not checked' if c.get('simulation') is None else format(c['simulation'], '.2f')}"
                       for n, c, _ in judges)  # fmt: skip
    passing = [(n, s) for n, c, s in judges if c.get("simulation") is not None and c["simulation"] >= JUDGE_MIN]
    weak, by_lexical = not passing, bool(passing) and passing[0][0] != judges[0][0]
    gate = (
        f"undecided (judge too weak: simulation on known-rule latents below {JUDGE_MIN}: {checks})"
        if any(c.get("simulation") is not None for _, c, _ in judges)
        else "undecided (the judge could not be checked)"
    )
    judge, study = passing[0] if passing else (judges[0][0], study)
    if passing:
        judge = f"decided by {judge}" + (f", {lexical['judge']}" if by_lexical else "") + \
            f" (simulation on known-rule latents: {checks})"  # fmt: skip
    rule = (f"decided by the run's judge if it scores at least {JUDGE_MIN} on known-rule latents, else by the lexical "
            "judge (token lookup, a weaker notion) if it does, else undecided")  # fmt: skip

    def verdict(cmps: list[dict]) -> str:
        return gate if weak else _verdict(cmps) + (" (by the lexical judge)" if by_lexical else "")

    def fmt(name, c):
        return f"{name}: {c['a']:.3f} vs {c['b']:.3f} (Δ {c['diff']:+.3f}, 95% [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}], " \
               f"{c['n'][0]} and {c['n'][1]} latents)"  # fmt: skip

    out = []
    cmps = {m: difference(_sims(study[vanilla]["scores"]), _sims(study[m]["scores"]), True, n_boot, seed)
            for m in matryoshkas if m in study and vanilla in study}  # fmt: skip
    cmps = {m: c for m, c in cmps.items() if c}
    if cmps:
        out.append(
            {
                "paper": "Permuted vanilla SAEs score higher on simulation than Matryoshka SAEs (Matryoshka 0.57-0.74)",
                "ours": f"mean simulation score, {vanilla} vs each Matryoshka SAE, latents sampled in the same "
                f"rank bands, {judge}: " + "; ".join(fmt(m, c) for m, c in cmps.items()),
                "verdict": verdict(list(cmps.values())),
                "rule": f"the interval of the difference excludes the reverse for every Matryoshka SAE; {rule}",
            }
        )
    inner = {m: difference(_sims(study[m]["scores"], 0, N // 4), _sims(study[m]["scores"], N // 2), True, n_boot, seed)
             for m in matryoshkas if m in study}  # fmt: skip
    inner = {m: c for m, c in inner.items() if c}
    if inner:
        out.append(
            {
                "paper": "In Matryoshka SAEs the innermost latents are more interpretable than the outermost",
                "ours": f"mean simulation score of latents ranked 1-{N // 4} vs {N // 2 + 1}-{N}, {judge}: "
                + "; ".join(fmt(m, c) for m, c in inner.items()),
                "verdict": verdict(list(inner.values())),
                "rule": f"the interval of inner minus outer excludes the reverse for every Matryoshka SAE; {rule}",
            }
        )
    return out
