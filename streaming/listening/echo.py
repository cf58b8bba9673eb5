"""Echo handling: remove the assistant's own voice from the user's microphone signal.

The server knows exactly what it sent, so it can cancel it (a reference-signal echo
canceller) instead of guessing. Three facts shape this module:

- Audio is sent faster than real time and the client plays it back to back, so the
  reference is placed on a *playout timeline* (in microphone-sample time): a chunk plays
  when the previous one ends, or now if the player was idle. A cancelled answer is
  flushed from the timeline, as the client flushes its player.
- The remaining delay (network, jitter buffer, sound card, air) is unknown and differs
  per client, so it is estimated by GCC-PHAT cross-correlation while the reference plays,
  and a short adaptive filter models only the room/device response around that delay.
- The filter is a partitioned-block frequency-domain NLMS with two copies: a background
  filter that always adapts and a foreground filter that only takes the background's
  weights when they cancel better. When the user talks over the echo ("double talk"), the
  background filter is disturbed but the foreground keeps cancelling.

A last block-level residual-echo gate attenuates blocks whose cleaned energy is no more
than the expected leftover of the echo, so a faint residue of the assistant's voice does
not look like user speech to the VAD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..audio import MODEL_SAMPLE_RATE as SAMPLE_RATE  # the microphone as the listener hears it
from .recent import RecentSamples


@dataclass(frozen=True)
class EchoConfig:
    enabled: bool = True
    block: int = 256               # samples per adaptation block (16 ms)
    filter_ms: int = 64            # echo tail modelled after the estimated delay
    max_delay_ms: int = 800        # playout-timeline-to-microphone delay searched
    pre_delay_ms: int = 8          # filter starts this much before the estimated delay
    step: float = 0.6              # NLMS step size (background filter)
    delay_every_ms: int = 125      # how often the delay is re-estimated while playing
    delay_window_ms: int = 1500    # microphone audio correlated per estimate
    delay_min_peak: float = 22.0   # GCC-PHAT peak / mean magnitude needed to trust a lag
    phat_beta: float = 0.6         # partial whitening of the cross-spectrum
    catch_up_ms: int = 1500        # past audio a newly placed filter is trained on
    catch_up_passes: int = 5
    residual_db: float = -12.0     # leftover echo expected after cancellation
    gate_floor_db: float = -30.0   # attenuation of blocks judged to be echo residue
    removed_db: float = -12.0      # a block the canceller took this much out of is echo
    reference_floor_db: float = -60.0  # reference quieter than this counts as silent
    # A block the cancelled signal comes out this much louder than the microphone: the
    # filter has diverged (it adds an echo estimate the microphone does not hold). The block
    # passes as heard and both filters restart from zero. Seen on the tune split of
    # `bench interrupt` (issue 18, echo with noise): a filter trained on the catch-up audio
    # put out echo 30-50 dB over the microphone for seconds, and whisper read the
    # assistant's words instead of the user's command.
    diverged_db: float = 6.0
    diverged_ms: int = 128         # ... in every block for this long
    # Blocks no reference can reach (nothing played within max_delay) skip the filter: the
    # same output and state as running it, without its FFTs (see EchoCanceller._quiet).
    skip_quiet: bool = True


def _db_to_power(db: float) -> float:
    return 10.0 ** (db / 10.0)


class EchoCanceller:
    """Cleans microphone audio given the assistant audio placed on the playout timeline.

    All positions are absolute 16 kHz microphone sample indices since reset.
    """

    def __init__(self, config: EchoConfig = EchoConfig()):
        self.config = config
        self.block = config.block
        self.partitions = max(1, int(np.ceil(config.filter_ms * SAMPLE_RATE / 1000 / self.block)))
        self.max_delay = config.max_delay_ms * SAMPLE_RATE // 1000
        self.reset()

    # ------------------------------------------------------------------ reference side
    def reset(self) -> None:
        b, p = self.block, self.partitions
        self._ref = np.zeros(0, dtype=np.float32)   # reference samples from _ref_base on
        self._ref_base = 0
        self.playout_end = 0                         # where the next chunk would start
        # recent raw mic, for the delay search
        self._mic = RecentSamples(self.config.delay_window_ms * SAMPLE_RATE // 1000)
        self._pending = np.zeros(0, dtype=np.float32)
        self.samples_in = 0        # microphone samples received
        self.samples_out = 0       # cleaned samples returned (multiple of block)
        self.delay: int | None = None
        self.calibrated_at: int | None = None  # sample where the current delay was adopted
        self.divergences = 0       # blocks where the filter had diverged (see EchoConfig.diverged_db)
        self._candidate: int | None = None
        self._next_delay_search = 0
        self._X = np.zeros((p, b + 1), dtype=np.complex128)       # reference spectra history
        self._W_fg = np.zeros((p, b + 1), dtype=np.complex128)
        self._W_bg = np.zeros((p, b + 1), dtype=np.complex128)
        self._power = np.full(b + 1, 1e-6)
        self._e_fg = self._e_bg = self._e_mic = 1e-9
        self._louder = 0           # samples in a row the filter made louder (diverged_db)
        self._gain = 1.0
        # Per-block statistics for callers (gating): (start sample, mic, echo est, out) power.
        self.history: list[tuple[int, float, float, float]] = []

    def add_reference(self, samples_16k: np.ndarray, now: int) -> int:
        """Queue assistant audio that was just sent; returns the sample where it will play."""
        x = np.asarray(samples_16k, dtype=np.float32).reshape(-1)
        start = max(int(now), self.playout_end)
        self._write_ref(start, x)
        self.playout_end = start + x.size
        return start

    def flush_reference(self, at: int) -> None:
        """The client dropped everything not yet played at microphone sample `at`."""
        at = max(int(at), self._ref_base)
        keep = at - self._ref_base
        if keep < self._ref.size:
            self._ref = self._ref[:keep].copy()
        self.playout_end = min(self.playout_end, at)

    def _write_ref(self, start: int, x: np.ndarray) -> None:
        end = start + x.size
        need = end - self._ref_base
        if need > self._ref.size:
            self._ref = np.concatenate([self._ref, np.zeros(need - self._ref.size, np.float32)])
        self._ref[start - self._ref_base : end - self._ref_base] += x

    def reference(self, start: int, end: int) -> np.ndarray:
        """Playout-timeline samples [start, end) (zeros where nothing plays)."""
        out = np.zeros(max(0, end - start), dtype=np.float32)
        lo, hi = max(start, self._ref_base), min(end, self._ref_base + self._ref.size)
        if hi > lo:
            out[lo - start : hi - start] = self._ref[lo - self._ref_base : hi - self._ref_base]
        return out

    def playing(self, start: int, end: int) -> bool:
        """Whether any reference audio sits on the timeline in [start - max_delay, end)."""
        if self.playout_end <= start - self.max_delay:
            return False  # every reference sample lies before playout_end
        r = self.reference(start - self.max_delay, end)
        return r.size > 0 and float(np.mean(r * r)) > _db_to_power(self.config.reference_floor_db)

    # ---------------------------------------------------------------- microphone side
    def process(self, mic_16k: np.ndarray) -> np.ndarray:
        """Cleaned microphone audio for every whole block received so far."""
        x = np.asarray(mic_16k, dtype=np.float32).reshape(-1)
        self._remember_mic(x)
        self.samples_in += x.size
        if not self.config.enabled:
            self.samples_out = self.samples_in
            return x
        if self._pending.size:
            x = np.concatenate([self._pending, x])
        n = (x.size // self.block) * self.block
        self._pending = x[n:].copy()
        if self._quiet(n):
            return self._pass_quiet(x[:n])
        out = np.empty(n, dtype=np.float32)
        for i in range(0, n, self.block):
            out[i : i + self.block] = self._block(x[i : i + self.block])
        self._trim()
        return out

    def _quiet(self, n: int) -> bool:
        """Whether the filter would read only silence for the next blocks.

        A block's filter frame reaches back at most max_delay + block before it, the delay
        search max_delay, and the filter keeps the frames of its last `partitions` blocks; all
        reference audio lies before playout_end. The gate must be fully open (it reopens
        within a few dozen blocks after echo).
        """
        reach = self.max_delay + self.block * (self.partitions + 1)
        return (self.config.skip_quiet and n > 0 and self._gain == 1.0
                and self.playout_end + reach <= self.samples_out)

    def _pass_quiet(self, x: np.ndarray) -> np.ndarray:
        """`_block` for blocks whose reference frames are all silent, without the FFTs.

        Silent frames make the echo estimate and the adaptation exactly zero, so each block
        only decays the reference power, feeds the error statistics the microphone power
        and passes the audio through the open gate: the same output and state as `_block`.
        """
        b, cfg = self.block, self.config
        blocks = x.reshape(-1, b)
        every = cfg.delay_every_ms * SAMPLE_RATE // 1000
        if self.delay is not None:
            self._X[:] = 0.0
        a = 0.7
        # every block's mean power in one call (per row the same sum as one block's mean)
        powers = np.mean(blocks.astype(np.float64) ** 2, axis=1)
        for power in powers.tolist():
            start = self.samples_out
            self.samples_out += b
            if start >= self._next_delay_search:
                self._next_delay_search = start + every  # a search finds nothing playing
            if self.delay is None:
                self.history.append((start, power + 1e-12, 0.0, power + 1e-12))
                continue
            self._power = 0.9 * self._power
            self._e_fg = a * self._e_fg + (1 - a) * power
            self._e_bg = a * self._e_bg + (1 - a) * power
            self._e_mic = a * self._e_mic + (1 - a) * power
            if self._e_bg < 0.7 * self._e_fg and self._e_bg < self._e_mic:
                self._W_fg = self._W_bg.copy()
                self._e_fg = self._e_bg
            elif self._e_bg > 4.0 * self._e_fg and self._e_bg > self._e_mic:
                self._W_bg = self._W_fg.copy()
                self._e_bg = self._e_fg
            self.history.append((start, power + 1e-12, 0.0, power))
            if len(self.history) > 4096:
                del self.history[:2048]
        self._trim()
        return x.astype(np.float32)

    def _remember_mic(self, x: np.ndarray) -> None:
        self._mic.append(x)

    def _trim(self) -> None:
        # Keep the reference needed by the delay search and the filter history.
        oldest = self.samples_out - self.max_delay - self.config.delay_window_ms * SAMPLE_RATE // 1000 - 4 * self.block
        drop = min(oldest - self._ref_base, self._ref.size)
        if drop > 4096:
            self._ref = self._ref[drop:]
            self._ref_base += drop

    def _block(self, mic: np.ndarray) -> np.ndarray:
        b, cfg = self.block, self.config
        start = self.samples_out
        self.samples_out += b
        if start >= self._next_delay_search:
            self._next_delay_search = start + cfg.delay_every_ms * SAMPLE_RATE // 1000
            self._search_delay(start)
        mic_power = float(np.mean(mic.astype(np.float64) ** 2)) + 1e-12
        if self.delay is None:
            self.history.append((start, mic_power, 0.0, mic_power))
            return mic
        m = mic.astype(np.float64)
        e_fg, y_fg = self._filter(m, start)
        louder = float(np.mean(e_fg**2)) > mic_power * _db_to_power(cfg.diverged_db)
        self._louder = self._louder + b if louder else 0
        if self._louder >= cfg.diverged_ms * SAMPLE_RATE // 1000:
            self._restart_filters()
            self.divergences += 1
            e_fg, y_fg = m, np.zeros_like(m)
        echo_power = float(np.mean(y_fg**2))
        out = self._gate(e_fg, echo_power, mic_power)
        self.history.append((start, mic_power, echo_power, float(np.mean(out**2))))
        if len(self.history) > 4096:
            del self.history[:2048]
        return out.astype(np.float32)

    def _filter(self, m: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """One block through both filters; adapts. Returns (foreground error, echo estimate)."""
        b = self.block
        lag = max(0, self.delay - self.config.pre_delay_ms * SAMPLE_RATE // 1000)
        frame = self.reference(start - b - lag, start + b - lag).astype(np.float64)
        X0 = np.fft.rfft(frame)
        self._X = np.roll(self._X, 1, axis=0)
        self._X[0] = X0
        self._power = 0.9 * self._power + 0.1 * (np.abs(X0) ** 2)
        y_fg = np.fft.irfft((self._W_fg * self._X).sum(axis=0), 2 * b)[b:]
        y_bg = np.fft.irfft((self._W_bg * self._X).sum(axis=0), 2 * b)[b:]
        e_fg, e_bg = m - y_fg, m - y_bg
        self._adapt(e_bg)
        # Foreground/background bookkeeping on smoothed error energies.
        a = 0.7
        self._e_fg = a * self._e_fg + (1 - a) * float(np.mean(e_fg**2))
        self._e_bg = a * self._e_bg + (1 - a) * float(np.mean(e_bg**2))
        self._e_mic = a * self._e_mic + (1 - a) * float(np.mean(m**2))
        if self._e_bg < 0.7 * self._e_fg and self._e_bg < self._e_mic:
            self._W_fg = self._W_bg.copy()
            self._e_fg = self._e_bg
        elif self._e_bg > 4.0 * self._e_fg and self._e_bg > self._e_mic:
            self._W_bg = self._W_fg.copy()  # background diverged (double talk): restart it
            self._e_bg = self._e_fg
        return e_fg, y_fg

    def _restart_filters(self) -> None:
        """Both filters back to zero (no echo modelled); they adapt again from the next block."""
        self._W_fg[:] = 0.0
        self._W_bg[:] = 0.0
        self._e_fg = self._e_bg = self._e_mic = 1e-9
        self._louder = 0

    def _catch_up(self, now: int) -> None:
        """Train a freshly placed filter on the microphone audio already heard.

        Without this the filter would start from zero at the moment the delay is found and
        need a second or two of echo to converge; the recent past holds that echo already.
        """
        b = self.block
        mics, base = self._mic.data, self._mic.base
        first = max(base, now - self.config.catch_up_ms * SAMPLE_RATE // 1000)
        first = now - ((now - first) // b) * b
        for _ in range(self.config.catch_up_passes):
            self._X[:] = 0.0
            for t in range(first, now, b):
                m = mics[t - base : t - base + b].astype(np.float64)
                if m.size == b:
                    self._filter(m, t)

    def _adapt(self, err: np.ndarray) -> None:
        b = self.block
        E = np.fft.rfft(np.concatenate([np.zeros(b), err]))
        norm = self.partitions * self._power + 1e-8
        G = self.config.step * np.conj(self._X) * E / norm
        # Gradient constraint: keep each partition a causal b-tap filter (overlap-save).
        g = np.fft.irfft(G, 2 * b, axis=1)
        g[:, b:] = 0.0
        self._W_bg += np.fft.rfft(g, axis=1)

    def _gate(self, err: np.ndarray, echo_power: float, mic_power: float) -> np.ndarray:
        """Attenuate a block that is only what is left of the echo.

        Such a block is no louder than the expected leftover, or the canceller removed most
        of the microphone energy (little of it can be the user). silero-vad calls even a
        -50 dBFS residue of speech "speech", so the residue must go, not just get quieter.
        """
        cfg = self.config
        err_power = float(np.mean(err**2)) + 1e-12
        leftover = echo_power * _db_to_power(cfg.residual_db)
        user = err_power > 4.0 * leftover and err_power > mic_power * _db_to_power(cfg.removed_db)
        target = 1.0 if user else float(np.sqrt(_db_to_power(cfg.gate_floor_db)))
        # Closes over a few blocks, opens almost at once, so word onsets are kept.
        rate = 0.5 if target < self._gain else 0.8
        self._gain = rate * target + (1 - rate) * self._gain
        return err * self._gain

    def _gcc(self, now: int) -> tuple[int, float] | None:
        """GCC-PHAT (lag, peak strength) between the playout timeline and the raw mic.

        None when there is too little microphone audio or nothing playing to compare.
        """
        cfg = self.config
        win = cfg.delay_window_ms * SAMPLE_RATE // 1000
        base = self._mic.base
        end = min(now, base + self._mic.size)
        start = max(end - win, base)
        if end - start < win // 3:
            return None
        mic = self._mic.data[start - base : end - base].astype(np.float64)
        ref = self.reference(start - self.max_delay, end).astype(np.float64)
        if float(np.mean(ref**2)) < _db_to_power(cfg.reference_floor_db) or float(np.mean(mic**2)) < 1e-9:
            return None
        n = 1 << int(np.ceil(np.log2(ref.size + mic.size)))
        cross = np.fft.rfft(ref, n) * np.conj(np.fft.rfft(mic, n))
        # PHAT-beta: whitening sharpens the peak; beta < 1 keeps voiced harmonics of two
        # unrelated voices from producing strong spurious peaks.
        cc = np.fft.irfft(cross / (np.abs(cross) ** cfg.phat_beta + 1e-12), n)
        # mic[t] ~ ref[t - d] puts the correlation peak at index max_delay - d.
        lags = cc[: self.max_delay + 1][::-1]  # lags[d] for d = 0..max_delay
        peak = int(np.argmax(lags))
        return peak, float(lags[peak] / (np.mean(np.abs(lags)) + 1e-12))  # unrelated audio: < ~20

    def _search_delay(self, now: int) -> None:
        found = self._gcc(now)
        if found is None:
            return
        peak, strength = found
        if strength < self.config.delay_min_peak:
            self._candidate = None
            return
        # Adopt a lag only when two searches in a row agree (one strong but wrong peak must
        # not reset a converged filter), and ignore small moves the filter taps absorb.
        agreed = self._candidate is not None and abs(peak - self._candidate) <= self.block // 2
        self._candidate = peak
        if agreed:
            self._adopt(peak, now)

    def _adopt(self, peak: int, now: int) -> None:
        if self.delay is None or abs(peak - self.delay) > self.block // 2:
            self._restart_filters()
            self.delay = peak
            self.calibrated_at = now
            self._catch_up(now)

    def removed_db(self, start: int, end: int) -> float:
        """How much quieter the cleaned signal is than the raw mic over [start, end), in dB.

        Near 0 when the microphone holds mostly the user (or nothing is playing); large when
        what the VAD hears is the remains of cancelled echo.
        """
        mic = out = 0.0
        for block_start, mic_power, _, out_power in reversed(self.history):
            if block_start < start:
                break
            if block_start < end:
                mic += mic_power
                out += out_power
        if mic <= 0.0:
            return 0.0
        return float(10.0 * np.log10(mic / (out + 1e-12)))

    def echo_suspected(self, start: int, end: int) -> bool:
        """Whether speech heard in [start, end) may be the assistant's own uncancelled voice.

        Only while the canceller has not found the echo path yet and audio is playing: then
        the microphone is correlated with the playout right away; a clear match calibrates
        the canceller on the spot. Too little audio to tell counts as suspect.
        """
        if not self.config.enabled or self.delay is not None or not self.playing(start, end):
            return False
        found = self._gcc(self.samples_out)
        if found is None:
            return True
        peak, strength = found
        if strength >= 1.5 * self.config.delay_min_peak:
            self._adopt(peak, self.samples_out)
        return strength >= self.config.delay_min_peak
