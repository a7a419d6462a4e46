import asyncio

from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.server_args import ServerArgs


class Engine:
    def __init__(self, **kwargs):
        self.server_args = ServerArgs(**kwargs)
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        self.tokenizer_manager = TokenizerManager(self.server_args)

    def shutdown(self):
        self.tokenizer_manager.scheduler_dead = True
