"""What `model.audio.conv_kernel` costs: the tiny audio encoder, forward and backward, on one core.

    python benchmarks/audio_conv_block.py [--repeats 10] [--kernel 15]

A batch shaped as the demo's (44 clips of 1.5-3.3 s of log-mel, the tiny preset's encoder: 2 layers of 128) runs
through the encoder without the convolution block and with it, side by side in one process, and the depthwise
convolution alone as the encoder runs it (a (1, k) Conv2d) against a depthwise Conv1d of the same weights, the
obvious way to write it. Times are the best of --repeats, because other processes may share the machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig

NUM_CLIPS, NUM_MEL_BINS, MAX_FRAMES = 44, 128, 330


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: caches, allocator, oneDNN primitives
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kernel", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(150, MAX_FRAMES + 1, (NUM_CLIPS,), generator=generator)
    mel = torch.randn(NUM_CLIPS, NUM_MEL_BINS, MAX_FRAMES, generator=generator)
    mel = mel * (torch.arange(MAX_FRAMES) < frames[:, None]).unsqueeze(1)  # zero padding, as the data layer's

    def encoder(kernel: int) -> AudioEncoder:
        torch.manual_seed(0)
        return AudioEncoder(AudioEncoderConfig(dim=128, num_layers=2, num_heads=4, ffn_dim=256,
                                               num_mel_bins=NUM_MEL_BINS, conv_kernel=kernel))

    def step(model: AudioEncoder):
        return lambda: model(mel, frames).sum().backward()

    plain, block = encoder(0), encoder(args.kernel)
    plain_ms, block_ms = best_ms(step(plain), args.repeats), best_ms(step(block), args.repeats)
    print(f"audio encoder forward + backward, {NUM_CLIPS} clips: without the block {plain_ms:.1f} ms, "
          f"with conv_kernel {args.kernel} {block_ms:.1f} ms: x{block_ms / plain_ms:.2f}")

    layer = block.layers[0]
    positions = int(block.num_tokens(frames).max())
    x = torch.randn(NUM_CLIPS, positions, 128, generator=generator, requires_grad=True)
    depthwise_1d = nn.Conv1d(128, 128, args.kernel, padding=args.kernel // 2, groups=128)
    with torch.no_grad():
        depthwise_1d.weight.copy_(layer.conv_depthwise.weight.squeeze(2))
        depthwise_1d.bias.copy_(layer.conv_depthwise.bias)
    as_2d = lambda: layer.conv_depthwise(x.transpose(1, 2).unsqueeze(2)).squeeze(2)  # noqa: E731 - the encoder's
    as_1d = lambda: depthwise_1d(x.transpose(1, 2))  # noqa: E731
    torch.testing.assert_close(as_2d(), as_1d(), rtol=1e-5, atol=1e-5)
    for name, fn in (("forward", lambda: as_2d().sum()), ("forward + backward", lambda: as_2d().sum().backward())):
        ours = best_ms(fn, args.repeats)
        other = best_ms((lambda: as_1d().sum()) if name == "forward" else (lambda: as_1d().sum().backward()), args.repeats)
        print(f"depthwise convolution {name}, ({NUM_CLIPS}, 128, {positions}): (1, k) Conv2d {ours:.2f} ms, "
              f"Conv1d {other:.2f} ms: x{other / ours:.1f} faster")


if __name__ == "__main__":
    main()
