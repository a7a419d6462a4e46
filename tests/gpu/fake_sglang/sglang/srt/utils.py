import pickle


class MultiprocessingSerializer:
    @staticmethod
    def serialize(obj, output_str=False):
        return pickle.dumps([(n, t.clone()) for n, t in obj])

    @staticmethod
    def deserialize(data):
        return pickle.loads(data)
