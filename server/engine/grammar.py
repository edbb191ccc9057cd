"""Grammar-constrained decoding: where a request's output stands in its grammar, and the tokens
allowed next.

Grammars are compiled elsewhere (xgrammar's `GrammarCompiler`, in the API); a request carries
its compiled grammar and gets a matcher of its own here. Before each token, the matcher
fills a bitmask of the tokens that keep the output inside the grammar and the logits of the
others become -inf; after it, the matcher takes the token. Requests with and without grammars
(and with any adapters) share every batch: the mask is per row.
"""

from __future__ import annotations

import torch
import xgrammar as xgr


class GrammarState:
    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place ([vocab])."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self.bitmask.to(logits.device))

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not follow the request's grammar")

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar allows nothing more (its stop token was taken)."""
        return self.matcher.is_terminated()
