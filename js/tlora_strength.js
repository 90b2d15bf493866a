// Port of tlora_core/strength.py `StrengthRule` in percents and `parse_keyframes` (the frontend tier runs both on
// one table): a LoRA's strength multiplier against the sampling's percent (0 = first step, pure noise; 1 = the end),
// as each model call gets it: zero outside [start, end), the end point excluded unless end is 1.

export const SHAPES = ["constant", "linear", "cosine", "smoothstep"];
const PAIR = /^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$/;

export function parseKeyframes(text) {
  const pairs = [];
  const items = String(text ?? "").split(/[,;\n]/).filter((p) => p.trim());
  items.forEach((item, i) => {
    const m = PAIR.exec(item);
    if (!m) throw new RangeError(`keyframe ${i + 1} '${item.trim()}' is not percent:strength (e.g. 0.5:1.0)`);
    const pct = Number(m[1]), s = Number(m[2]);
    if (!(pct >= 0 && pct <= 1)) throw new RangeError(`keyframe ${i + 1} '${item.trim()}': percent ${pct} is outside 0..1`);
    if (pairs.length && pct <= pairs.at(-1)[0])
      throw new RangeError(`keyframe ${i + 1} '${item.trim()}': percents must increase (after ${pairs.at(-1)[0]})`);
    pairs.push([pct, s]);
  });
  return pairs;
}

function shape(u, name) {
  if (name === "constant") return 0;
  if (name === "linear") return u;
  if (name === "cosine") return 0.5 - 0.5 * Math.cos(Math.PI * u);
  return u * u * (3 - 2 * u);
}

// c: { start, end, strengthStart, strengthEnd, shape, keyframes }
export function strengthAt(c, percent) {
  const p = Math.min(Math.max(percent, 0), 1);
  const ks = c.keyframes ?? [];
  if (ks.length) {
    if (p <= ks[0][0]) return ks[0][1];
    for (let i = 1; i < ks.length; i++) {
      const [p0, s0] = ks[i - 1], [p1, s1] = ks[i];
      if (p <= p1) return s0 + ((s1 - s0) * (p - p0)) / (p1 - p0);
    }
    return ks.at(-1)[1];
  }
  if (p < c.start || (c.end < 1 ? p >= c.end : p > c.end)) return 0;
  const u = c.end === c.start ? 0 : (p - c.start) / (c.end - c.start);
  return c.strengthStart + (c.strengthEnd - c.strengthStart) * shape(u, c.shape);
}

// The curve's value at n + 1 evenly spaced percents, or { error } for a schedule the server would refuse.
export function strengthCurve(c, n = 200) {
  if (!(c.start >= 0 && c.start <= 1) || !(c.end >= 0 && c.end <= 1))
    return { error: "start_percent and end_percent must be in 0..1" };
  if (c.end < c.start) return { error: `end_percent ${c.end} is before start_percent ${c.start}` };
  let keyframes;
  try {
    keyframes = parseKeyframes(c.keyframesText);
  } catch (e) {
    return { error: e.message };
  }
  const cc = { ...c, keyframes };
  return { values: Array.from({ length: n + 1 }, (_, i) => strengthAt(cc, i / n)) };
}
