"""Packing: no sample is split or lost, documents keep their boundaries, the pool packs densely."""

from __future__ import annotations

import torch

from omni_train.data.packing import IGNORE_INDEX, Packer, collate_packed
from omni_train.data.sample import TokenizedSample


def sample(n: int, value: int) -> TokenizedSample:
    return TokenizedSample(input_ids=torch.full((n,), value), labels=torch.arange(n),
                           modality_ids=torch.zeros(n, dtype=torch.int8), timestamps_s=torch.full((n,), -1.0), key=str(value))


def test_best_fit_keeps_every_sample_whole_and_dense():
    lengths = torch.randint(10, 400, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    packer, sequences, stream = Packer(1024, 32), [], iter(enumerate(lengths))
    done = False
    while True:
        while not packer.full() and not done:
            item = next(stream, None)
            if item is None:
                done = True
            else:
                packer.add(sample(item[1], item[0]))
        seq = packer.pop_sequence()
        if not seq:
            break
        assert sum(len(s) for s in seq) <= 1024
        sequences.append(seq)
    got = sorted(int(s.input_ids[0]) for seq in sequences for s in seq)
    assert got == list(range(500))                     # each sample exactly once
    assert all(len(s) == lengths[int(s.input_ids[0])] for seq in sequences for s in seq)  # never cut
    fill = sum(lengths) / (len(sequences) * 1024)
    assert fill > 0.97, fill


def test_collate_marks_documents_and_positions():
    batch = collate_packed([[sample(3, 7), sample(2, 8)], [sample(4, 9)]], seq_len=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[7, 7, 7, 8, 8, 0], [9, 9, 9, 9, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]]
    assert batch["labels"][0, 5] == IGNORE_INDEX and batch["labels"][1].tolist()[:4] == [0, 1, 2, 3]
    assert batch["seq_lens"].tolist() == [3, 2, 4] and batch["num_real_tokens"] == 9
