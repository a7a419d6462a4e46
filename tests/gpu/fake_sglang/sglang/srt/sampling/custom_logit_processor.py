import json
import pickle


class CustomLogitProcessor:
    def __call__(self, logits, custom_param_list=None):
        raise NotImplementedError

    @classmethod
    def to_str(cls) -> str:
        return json.dumps({"callable": pickle.dumps(cls).hex()})

    @classmethod
    def from_str(cls, s: str):
        return pickle.loads(bytes.fromhex(json.loads(s)["callable"]))()
