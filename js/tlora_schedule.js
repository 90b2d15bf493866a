// Port of tlora_core/schedule.py `active_rank` (tests run both on one table of values).
// power: r = int(((T - t) / T) ** alpha * (R - Rmin)) + Rmin, clamped to R, T = 1000; power_ceil and cosine are
// the curves of the trainers that shape it their own way (tlora_core/writers.py).

export const MAX_TIMESTEP = 1000;

export function activeRank(t, maxRank, minRank = 1, alpha = 1.0, maxTimestep = MAX_TIMESTEP, curve = "power") {
  if (!Number.isInteger(maxRank) || maxRank < 1) throw new RangeError(`max_rank must be >= 1, got ${maxRank}`);
  if (!Number.isInteger(minRank) || minRank < 1 || minRank > maxRank)
    throw new RangeError(`min_rank must be in [1, ${maxRank}], got ${minRank}`);
  if (!(alpha > 0) || !Number.isFinite(alpha)) throw new RangeError(`alpha (the schedule exponent) must be > 0, got ${alpha}`);
  if (!(t >= 0 && t <= maxTimestep)) throw new RangeError(`timestep must be in [0, ${maxTimestep}], got ${t}`);
  const span = maxRank - minRank;
  let r;
  if (curve === "power") {
    // Math.trunc == Python int() for the non-negative values this produces
    r = Math.trunc(Math.pow((maxTimestep - t) / maxTimestep, alpha) * span) + minRank;
  } else {
    // the sigma trainers' float32 arithmetic: p = 1 - sigma
    const f = Math.fround;
    let p = f(1 - f(t / maxTimestep));
    if (curve === "power_ceil") r = Math.ceil(f(f(f(Math.pow(p, alpha)) * span) + minRank));
    else if (curve === "linear" || curve === "cosine") {
      if (curve === "cosine") p = f(0.5 - f(0.5 * f(Math.cos(f(Math.PI * p)))));
      r = minRank + Math.floor(f(span * p));
    } else throw new RangeError(`curve must be one of power, power_ceil, linear, cosine, got ${curve}`);
  }
  return Math.min(Math.max(r, minRank), maxRank);
}

// Active rank for every integer timestep 0..999.
export function scheduleRanks(maxRank, minRank = 1, alpha = 1.0, curve = "power") {
  const out = new Array(MAX_TIMESTEP);
  for (let t = 0; t < MAX_TIMESTEP; t++) out[t] = activeRank(t, maxRank, minRank, alpha, MAX_TIMESTEP, curve);
  return out;
}

// Port of tlora_core/recorded.py `resolve_schedule` (the frontend tier runs both on one table of cases): the
// schedule a Load T-LoRA node runs, from what the file records (`recorded`, as /tlora/info answers it) and the
// widgets { source, maxRank, minRank, alpha }. Returns { maxRank, minRank, alpha } or { error }.
export function resolveSchedule(recorded, { source, maxRank, minRank, alpha }) {
  const fileRank = recorded?.max_rank?.value ?? null;
  if (fileRank == null) return maxRank > 0 ? { maxRank, minRank, alpha } : { error: "no file rank" };
  if (maxRank > fileRank) return { error: `max_rank override ${maxRank} exceeds the file's rank ${fileRank}` };
  const r = maxRank || fileRank;
  const recordedOr = (name, slider) => (recorded[name] && recorded[name].source !== "default" ? recorded[name].value : slider);
  if (source === "file") return { maxRank: r, minRank: recordedOr("min_rank", minRank), alpha: recordedOr("alpha", alpha) };
  if (source === "sliders") return { maxRank: r, minRank, alpha };
  if (source === "all_ranks") return { maxRank: r, minRank: r, alpha: 1.0 };
  return { error: `schedule_source must be one of file, sliders, all_ranks, got '${source}'` };
}
