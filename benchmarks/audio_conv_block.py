"""What `model.audio.conv_kernel` costs: the tiny audio encoder, forward and backward, on one core.

    python benchmarks/audio_conv_block.py [--repeats 10] [--kernel 15]

A batch shaped as the demo's (44 clips of 1.5-3.3 s of log-mel, the tiny preset's encoder: 2 layers of 128) runs
through the encoder without the convolution block and with it, side by side in one process, and the depthwise
convolution alone as the encoder runs it (`row_depthwise_conv`: a (1, k) Conv2d whose weight gradient is one grouped
Conv1d forward) against the same Conv2d with oneDNN's own backward and against a depthwise Conv1d of the same weights,
the obvious way to write it. Times are the best of --repeats, because other processes may share the machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from omni_train.model.audio_encoder import AudioEncoder, AudioEncoderConfig, row_depthwise_conv

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
    ours = lambda: row_depthwise_conv(x, layer.conv_depthwise).transpose(1, 2)  # noqa: E731 - the encoder's
    as_2d = lambda: layer.conv_depthwise(x.transpose(1, 2).unsqueeze(2)).squeeze(2)  # noqa: E731
    as_1d = lambda: depthwise_1d(x.transpose(1, 2))  # noqa: E731
    torch.testing.assert_close(ours(), as_1d(), rtol=1e-5, atol=1e-5)
    shape = f"({NUM_CLIPS}, 128, {positions})"
    for name, run in (("forward", lambda f: f().sum()), ("forward + backward", lambda f: f().sum().backward())):
        times = {label: best_ms(lambda: run(f), args.repeats)
                 for label, f in (("ours", ours), ("Conv2d", as_2d), ("Conv1d", as_1d))}
        print(f"depthwise convolution {name}, {shape}: ours {times['ours']:.2f} ms, (1, k) Conv2d with oneDNN's "
              f"backward {times['Conv2d']:.2f} ms (x{times['Conv2d'] / times['ours']:.1f}), Conv1d "
              f"{times['Conv1d']:.2f} ms (x{times['Conv1d'] / times['ours']:.1f})")


if __name__ == "__main__":
    main()
