"""Preference data end to end: sources -> checked records -> cached token ids -> grain batches.

This module holds a split (`PreferenceData`, `load_preference_data`); the stages are
`sources` (reading), `tokenized` (one source checked, tokenized, cached, truncated),
`reports` (drops and lengths) and `batches` (the step's batch, collated).

Sources. `data.train_files` / `data.test_files` name a path, a list of paths or
a hub id (loaded with `datasets.load_dataset(id, split=data.split)`, or
`data.test_split` for test); `data.mixture` maps sources to the fraction of
each to keep (the first `floor(fraction * rows)` rows, as alignment-handbook's
`dataset_mixer`) and replaces `train_files`. Local files are `.json` / `.jsonl`
(read line by line by `json_rows`, so a malformed line is a bad row with its
number and rows of mixed types survive to be counted) and `.parquet` (read by
`datasets`).
`builtin:demo` and `builtin:demo-standard` name the shipped demo data
(conversational / standard), split by `data.split` / `data.test_split`.

Rows. Each source is checked and put in explicit-prompt form
(`formats.normalize_row`); bad rows are dropped and counted per reason with
their first row numbers (1-based lines of JSON lines files, 1-based row indices
otherwise). More than `data.max_invalid_fraction` bad rows in a source stops
the run. Token ids are computed once per source with `datasets.Dataset.map`,
cached under `<data.cache_dir or datasets' cache>/mmpo_jax_tokenized/` with a
fingerprint of the records, the tokenizer's content and `formats.py`'s code; a
restart loads the cache file without tokenizing. A source that fails (a missing
package stops tokenization; too many bad rows) leaves no cache file, so the
next run tokenizes again. Truncation is applied after the cache (lengths only),
so changing the limits never re-tokenizes.

Batches. A global batch is a pure function of `(data.seed, step)`:
`epoch, i = divmod(step, steps_per_epoch)`, the epoch's order is grain's
`MapDataset.range(rows).shuffle(seed)` read at `epoch * rows + j` (grain
reseeds each epoch with `seed + epoch`), and global batch `step` is positions
`i * batch_size ... (i + 1) * batch_size - 1` of that order. The last
`rows % batch_size` rows of each epoch's order are dropped (different rows each
epoch; reported by `batch_plan`). Process `p` of `P` takes the contiguous slice
`[p * batch_size / P, (p + 1) * batch_size / P)` of the pairs, so a resumed run
(given its step) sees exactly the batches it would have seen, on any number of
processes that divides `batch_size`.

Every sequence of a global batch is right-padded to the same bucket length:
the smallest of `bucket_lengths(max_length, 16)` (powers of two from 16, then
`max_length`: `ceil(log2(max_length / 16)) + 1` buckets, 7 for 1024) that holds
the batch's longest prompt + completion. All processes pick the same length,
since they all hold every row's length.

`PreferenceBatch` (numpy arrays; `pairs` = `batch_size / P` on each process):

    input_ids      int32 [pairs, 2, seq]  [:, 0] prompt + chosen, [:, 1] prompt + rejected,
                                          then `pad` ids
    attention_mask int32 [pairs, 2, seq]  1 on real tokens, 0 on padding
    loss_mask      int32 [pairs, 2, seq]  1 where input_ids[p, k, t] is a completion token
                                          and t >= 1: the token predicted from ids[..., :t]
                                          (so logits at t - 1 score it)
    pair_mask      int32 [pairs]          1 for a real pair, 0 for a padding pair (eval only)
    example_index  int32 [pairs]          the pair's row in `PreferenceData` (-1: padding)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmpo_jax.data import formats
from mmpo_jax.data.formats import SpecialIds
from mmpo_jax.data.reports import SplitReport, lengths_table
from mmpo_jax.data.sources import Split, source_specs
from mmpo_jax.data.tokenized import SourceData, prepare_source
from mmpo_jax.data.tokenizers import special_ids, tokenizer_fingerprint, tokenizer_of
from mmpo_jax.errors import UserError
from mmpo_jax.data.tokenizer_protocol import Tokenizer

if TYPE_CHECKING:

    from mmpo_jax.config_schema import DataConfig


# A split: every source, ready for batches
@dataclass
class PreferenceData:
    """The kept rows of a split, in source order, with untruncated ids and their lengths."""

    sources: list[SourceData]
    special: SpecialIds
    max_length: int
    max_prompt_length: int | None
    report: SplitReport
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        sizes = [len(s) for s in self.sources]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lengths = (
            np.concatenate([s.lengths for s in self.sources])
            if self.sources
            else np.zeros((0, 3), np.int64)
        )

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def seq_lengths(self) -> np.ndarray:
        """`[rows]` prompt + longer completion, after truncation."""
        return self.lengths[:, 0] + np.maximum(self.lengths[:, 1], self.lengths[:, 2])

    def _locate(self, i: int) -> tuple[SourceData, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.sources[s], i - int(self._offsets[s])

    def pair(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """Row `i`'s truncated `(prompt, chosen, rejected)` ids."""
        src, j = self._locate(i)
        prompt, chosen, rejected = src.ids(j)
        p, c, r = (int(x) for x in src.lengths[j])
        return (
            formats.keep_prompt_end(prompt.tolist(), p, self.special.bos),
            chosen[:c].tolist(),
            rejected[:r].tolist(),
        )

    def origin(self, i: int) -> str:
        """Where row `i` came from, as a user finds it: `file.jsonl line 12`."""
        src, j = self._locate(i)
        return f"{src.report.name} {src.report.label} {src.numbers[j]}"


def load_preference_data(
    cfg: DataConfig,
    which: Split,
    tokenizer: Tokenizer | None = None,
    log: Callable[[str], None] | None = None,
) -> PreferenceData | None:
    """Loads, checks and tokenizes the train or test split (None: no test data set).

    `log` (a run's log) hears, per source, `tokenizing N rows of NAME` or `reusing the
    tokenized cache of NAME (N rows)`, then what was kept and the seconds taken;
    datasets' own progress bar is off while it does. None: nothing is said."""
    specs = source_specs(cfg, which)
    if not specs:
        return None
    if tokenizer is None:
        tokenizer = tokenizer_of(cfg)
    special = special_ids(tokenizer)
    tok_fp = tokenizer_fingerprint(tokenizer)
    sources = [prepare_source(s, cfg, tokenizer, tok_fp, special, log) for s in specs]
    if sum(s.report.kept for s in sources) == 0:
        raise UserError(
            f"{specs[0].key}: no row of the {which} data is left to train on "
            f"({sum(s.report.rows_read for s in sources)} read, all dropped); "
            "see the reasons with `mmpo-jax inspect-data`"
        )
    before = np.concatenate([s.lengths_before for s in sources])
    after = np.concatenate([s.lengths for s in sources])
    prompt_cut = after[:, 0] < before[:, 0]
    completion_cut = (after[:, 1] < before[:, 1]) | (after[:, 2] < before[:, 2])
    report = SplitReport(
        split=which,
        sources=[s.report for s in sources],
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        prompt_truncated=int(prompt_cut.sum()),
        completion_truncated=int(completion_cut.sum()),
        truncated=int((prompt_cut | completion_cut).sum()),
        lengths_before=lengths_table(before),
        lengths=lengths_table(after),
    )
    return PreferenceData(
        sources, special, cfg.max_length, cfg.max_prompt_length, report, tokenizer
    )
