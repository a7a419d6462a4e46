import asyncio
import pickle

from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.server_args import ServerArgs


class Engine:
    def __init__(self, **kwargs):
        self.server_args = ServerArgs(**kwargs)
        # SGLang hands ServerArgs to its scheduler processes (spawn): all of it must pickle, the
        # custom_sigquit_handler included (2026-12-07 on an H200: a handler bound to the adapter,
        # which held a lambda, failed every engine start there)
        pickle.dumps(self.server_args)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        self.tokenizer_manager = TokenizerManager(self.server_args)

    def shutdown(self):
        self.tokenizer_manager.scheduler_dead = True

    # the synchronous/async conveniences of sglang.Engine that the direct scripts use
    async def async_generate(self, input_ids=None, sampling_params=None, return_logprob=False, stream=False, rid=None):
        from sglang.srt.managers.io_struct import GenerateReqInput

        if input_ids and isinstance(input_ids[0], list):
            return [await self.async_generate(p, sampling_params, return_logprob) for p in input_ids]
        self._n = getattr(self, "_n", 0) + 1
        obj = GenerateReqInput(input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
                               stream=stream, rid=rid or f"direct-{self._n:08d}")
        agen = self.tokenizer_manager.generate_request(obj)
        if stream:
            return agen
        last = None
        async for out in agen:
            last = out
        state_lps = last["meta_info"].setdefault("output_token_logprobs", [])
        state_lps.extend((0.0, t, None) for t in last["output_ids"])
        return last

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False):
        return self.loop.run_until_complete(self.async_generate(input_ids, sampling_params, return_logprob))

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
        from sglang.srt.utils import MultiprocessingSerializer

        tm = self.tokenizer_manager
        payload = MultiprocessingSerializer.serialize(named_tensors)
        obj = UpdateWeightsFromTensorReqInput(serialized_named_tensors=[payload], flush_cache=flush_cache)
        was, tm.is_pause = tm.is_pause, True
        try:
            return self.loop.run_until_complete(tm.update_weights_from_tensor(obj, None))
        finally:
            tm.is_pause = was

    def release_memory_occupation(self, tags=None):
        return self.loop.run_until_complete(self.tokenizer_manager.release_memory_occupation(
            __import__("sglang.srt.managers.io_struct", fromlist=["x"]).ReleaseMemoryOccupationReqInput(tags=tags)))

    def resume_memory_occupation(self, tags=None):
        return self.loop.run_until_complete(self.tokenizer_manager.resume_memory_occupation(
            __import__("sglang.srt.managers.io_struct", fromlist=["x"]).ResumeMemoryOccupationReqInput(tags=tags)))
