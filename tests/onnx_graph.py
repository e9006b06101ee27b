"""Multiply-accumulates of an ONNX graph's products, read from its inferred shapes.

Used to check that an exported crossvit_fast graph keeps the CLS cross-attention without K and V
over the tokens (it then does fewer MACs than timm's export by about those projections).
"""
import math
from typing import Dict, List, Optional

import onnx
from onnx import shape_inference


def _shapes(model: onnx.ModelProto) -> Dict[str, List[Optional[int]]]:
    """Every value's shape (None for a dimension without a fixed size), initializers included."""
    model = shape_inference.infer_shapes(model)
    graph = model.graph
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                        for d in vi.type.tensor_type.shape.dim]
              for vi in (*graph.value_info, *graph.input, *graph.output)}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    return shapes


def product_macs(model: onnx.ModelProto) -> int:
    """MACs of the MatMul, Gemm, Einsum and Conv nodes of a graph exported at a fixed batch size;
    raises ValueError where a product's shapes are not all known."""
    # nodes inside local functions or control-flow subgraphs would not be counted
    assert not model.functions, "the graph has local functions: inline them first"
    assert not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for node in model.graph.node for a in node.attribute), "control-flow subgraphs"
    shapes = _shapes(model)

    def shape(name: str) -> List[int]:
        dims = shapes.get(name)
        if dims is None or None in dims:
            raise ValueError(f"the shape of {name!r} is not fixed: export at a fixed batch size")
        return dims

    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMul":
            total += math.prod(shape(node.output[0])) * shape(node.input[0])[-1]
        elif node.op_type == "Gemm":
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            total += math.prod(shape(node.output[0])) * shape(node.input[0])[0 if trans_a else 1]
        elif node.op_type == "Einsum":
            equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
            sizes = {}
            for term, name in zip(equation.split("->")[0].split(","), node.input):
                sizes.update(zip(term.strip(), shape(name)))
            total += math.prod(sizes.values())
        elif node.op_type == "Conv":
            total += math.prod(shape(node.output[0])) * math.prod(shape(node.input[1])[1:])
    return total
