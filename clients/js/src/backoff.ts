export interface BackoffOptions {
  /** Base delay of the first retry, in ms (default 500). */
  initialMs?: number;
  /** The cap: no delay is longer than this, in ms (default 30000). */
  maxMs?: number;
}

export const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30_000 } as const;

/**
 * The ceiling of the n-th retry's delay (n from 0): `min(maxMs, initialMs * 2^n)`.
 */
export function backoffCeiling(attempt: number, opts: BackoffOptions = {}): number {
  const initial = opts.initialMs ?? DEFAULT_BACKOFF.initialMs;
  const max = opts.maxMs ?? DEFAULT_BACKOFF.maxMs;
  // 2^n overflows to Infinity for large n, which min() handles.
  return Math.min(max, initial * 2 ** Math.max(0, attempt));
}

/**
 * Exponential backoff with full jitter: a uniformly random delay in `[0, ceiling)`
 * (AWS architecture blog, "Exponential Backoff And Jitter"). `random` is `Math.random` unless
 * a test gives another.
 */
export function backoffDelay(
  attempt: number,
  opts: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  return Math.floor(random() * backoffCeiling(attempt, opts));
}
