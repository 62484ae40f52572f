"""Make a converted API prompt cheap to run: fewer steps and a small image, in the API prompt only.

The workflows keep their real settings; CI runs the same graph with these inputs lowered.
"""
SIZE = 128  # px: EmptyLatentImage size (Load Image's input file is generated at this size)
STEPS = 2  # on CPU a full SD1.5 UNet call costs seconds whatever the size: the step count is the cost
# input name -> value, for every node that has it (the loops of the optimising nodes)
CHEAP = {"steps": STEPS, "inner_iterations": 1, "iterations": 1, "optimized_steps": 1, "blend_steps": 1}


def cheap(prompt):
    """A copy of the API prompt with its step counts and latent size lowered."""
    out = {}
    for node_id, node in prompt.items():
        inputs = dict(node["inputs"])
        for name, value in CHEAP.items():
            if name in inputs and not isinstance(inputs[name], list):  # a link stays a link
                inputs[name] = min(inputs[name], value)
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        out[node_id] = {**node, "inputs": inputs}
    return out
