import torch

from cifar_onecycle import ResNet9, count_parameters, summarize

# The seed's table (shared/seed/EVA6_Session9.md), verbatim.
SEED_TABLE = """\
----------------------------------------------------------------
        Layer (type)               Output Shape         Param #
================================================================
            Conv2d-1           [-1, 64, 32, 32]           1,728
       BatchNorm2d-2           [-1, 64, 32, 32]             128
            Conv2d-3          [-1, 128, 32, 32]          73,728
         MaxPool2d-4          [-1, 128, 16, 16]               0
       BatchNorm2d-5          [-1, 128, 16, 16]             256
            Conv2d-6          [-1, 128, 16, 16]         147,456
       BatchNorm2d-7          [-1, 128, 16, 16]             256
            Conv2d-8          [-1, 128, 16, 16]         147,456
       BatchNorm2d-9          [-1, 128, 16, 16]             256
           Conv2d-10          [-1, 256, 16, 16]         294,912
        MaxPool2d-11            [-1, 256, 8, 8]               0
      BatchNorm2d-12            [-1, 256, 8, 8]             512
           Conv2d-13            [-1, 512, 8, 8]       1,179,648
        MaxPool2d-14            [-1, 512, 4, 4]               0
      BatchNorm2d-15            [-1, 512, 4, 4]           1,024
           Conv2d-16            [-1, 512, 4, 4]       2,359,296
      BatchNorm2d-17            [-1, 512, 4, 4]           1,024
           Conv2d-18            [-1, 512, 4, 4]       2,359,296
      BatchNorm2d-19            [-1, 512, 4, 4]           1,024
        MaxPool2d-20            [-1, 512, 1, 1]               0
           Linear-21                   [-1, 10]           5,130
================================================================
Total params: 6,573,130
Trainable params: 6,573,130
Non-trainable params: 0
----------------------------------------------------------------
Input size (MB): 0.01
Forward/backward pass size (MB): 4.88
Params size (MB): 25.07
Estimated Total Size (MB): 29.97
----------------------------------------------------------------"""


def test_parameter_count():
    assert count_parameters(ResNet9()) == 6_573_130


def test_logit_scale_adds_no_parameters_and_scales_logits():
    torch.manual_seed(0)
    a = ResNet9().eval()
    b = ResNet9(logit_scale=0.125).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert count_parameters(b) == 6_573_130
    assert a(x).shape == (2, 10)
    torch.testing.assert_close(b(x), a(x) * 0.125)


def test_convolutions_have_no_bias_and_fc_has_one():
    m = ResNet9()
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    assert m.fc.bias is not None


def test_summary_is_the_seed_table_line_for_line():
    s = summarize(ResNet9())
    assert len(s.rows) == 21
    assert s.table().splitlines() == SEED_TABLE.splitlines()
    assert round(s.input_mb, 2) == 0.01 and round(s.forward_backward_mb, 2) == 4.88
    assert round(s.params_mb, 2) == 25.07 and round(s.total_mb, 2) == 29.97


def test_summary_of_the_network_for_other_class_counts(capsys):
    from cifar_onecycle.cli import main

    assert main(["summary", "--classes", "100"]) == 0  # CIFAR-100: 512 x 100 weights and 100 biases more
    printed = capsys.readouterr().out.splitlines()
    seed = SEED_TABLE.splitlines()
    assert "           Linear-21                  [-1, 100]          51,300" in printed
    assert "Total params: 6,619,300" in printed and printed[:22] == seed[:22]  # the rest is the seed's
    for n in (1, 10_001):
        assert main(["summary", "--classes", str(n)]) == 2
        assert capsys.readouterr().err == f"cifar-onecycle: error: --classes {n}: a network for 2 to 10,000 classes\n"


def test_the_receptive_field_is_the_one_computed_by_hand(capsys):
    # r_out = r_in + (kernel - 1) x jump_in and jump_out = jump_in x stride, through the prep layer,
    # layer 1 and its residual branch, layer 2, layer 3 and its branch, and the max-pool of 4
    s = summarize(ResNet9())
    assert [(r.name, r.kernel, r.stride, r.output_size, r.jump, r.receptive_field) for r in s.receptive_fields] == [
        ("Conv2d-1", 3, 1, 32, 1, 3), ("Conv2d-3", 3, 1, 32, 1, 5), ("MaxPool2d-4", 2, 2, 16, 2, 6),
        ("Conv2d-6", 3, 1, 16, 2, 10), ("Conv2d-8", 3, 1, 16, 2, 14), ("Conv2d-10", 3, 1, 16, 2, 18),
        ("MaxPool2d-11", 2, 2, 8, 4, 20), ("Conv2d-13", 3, 1, 8, 4, 28), ("MaxPool2d-14", 2, 2, 4, 8, 32),
        ("Conv2d-16", 3, 1, 4, 8, 48), ("Conv2d-18", 3, 1, 4, 8, 64), ("MaxPool2d-20", 4, 4, 1, 32, 88)]
    from cifar_onecycle.cli import main

    assert main(["summary", "--receptive-field"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:len(SEED_TABLE.splitlines())] == SEED_TABLE.splitlines()
    assert "           Conv2d-13        3        1        1        8        4               28" in printed
    assert printed[-1] == "The receptive field reaches the input's 32 pixels at MaxPool2d-14; the last layer's is 88."
    # dilation widens a kernel's reach; a padding given as a word is shown as given
    nn = torch.nn
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, dilation=2, padding="same"))
    rows = summarize(dilated).receptive_fields
    assert [(r.padding, r.output_size, r.jump, r.receptive_field) for r in rows] == [(0, 15, 2, 3), ("same", 15, 2, 11)]
    assert summarize(dilated).receptive_field_table().endswith("stays below the input's 32 pixels.")


def reference_forward(params: dict, x: torch.Tensor, training: bool, logit_scale: float = 1.0) -> torch.Tensor:
    """The seed's network written out with functional calls, in the seed's order, from the weights
    alone: PrepLayer conv-BN-ReLU; Layer1 conv-pool-BN-ReLU plus (conv-BN-ReLU)x2; Layer2
    conv-pool-BN-ReLU; Layer3 as Layer1; max-pool 4; FC."""
    import torch.nn.functional as F

    def conv_bn_relu(x, name, pool=False):
        x = F.conv2d(x, params[f"{name}.conv.weight"], padding=1)
        if pool:
            x = F.max_pool2d(x, 2)
        x = F.batch_norm(x, params[f"{name}.bn.running_mean"].clone(), params[f"{name}.bn.running_var"].clone(),
                         params[f"{name}.bn.weight"], params[f"{name}.bn.bias"], training=training)
        return F.relu(x)

    def residual_layer(x, name):
        x = conv_bn_relu(x, f"{name}.x", pool=True)
        return x + conv_bn_relu(conv_bn_relu(x, f"{name}.r1"), f"{name}.r2")

    x = conv_bn_relu(x, "prep")
    x = residual_layer(x, "layer1")
    x = conv_bn_relu(x, "layer2", pool=True)
    x = residual_layer(x, "layer3")
    x = F.max_pool2d(x, 4).flatten(1)
    return F.linear(x, params["fc.weight"], params["fc.bias"]) * logit_scale


def test_the_forward_pass_is_the_seeds_network():
    torch.manual_seed(0)
    model = ResNet9(logit_scale=0.125)
    with torch.no_grad():  # BatchNorm that does something: random affine and running statistics
        for name, t in model.state_dict().items():
            if "bn." in name and t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith(("weight", "running_var")) else torch.randn_like(t))
    params = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            got = model(x)
        assert torch.allclose(got, reference_forward(params, x, training, 0.125), rtol=1e-4, atol=1e-5), training


def test_training_flops_per_image_are_the_layers_multiply_adds_times_six():
    from cifar_onecycle.model import training_flops_per_image

    # Multiply-adds, layer by layer (output pixels x output channels x input channels x 3 x 3):
    # prep 3-64 at 32x32; layer 1's conv 64-128 at 32x32 (before its pool); its residual's two convs
    # 128-128 at 16x16; layer 2 128-256 at 16x16; layer 3 256-512 at 8x8; its residual 512-512 at
    # 4x4, twice; the FC layer 512 x 10.
    macs = (32 * 32 * 64 * 3 * 9 + 32 * 32 * 128 * 64 * 9 + 2 * 16 * 16 * 128 * 128 * 9 + 16 * 16 * 256 * 128 * 9
            + 8 * 8 * 512 * 256 * 9 + 2 * 4 * 4 * 512 * 512 * 9 + 512 * 10)
    model = ResNet9().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert training_flops_per_image(model) == 2 * 3 * macs  # x2 FLOPs a multiply-add, x3 forward and backward
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_epoch_line_shows_the_achieved_tflops_where_measured():
    from cifar_onecycle.results import EpochMetrics, format_epoch, metrics_csv

    row = EpochMetrics(1, 0.1, 2.0, 0.3, 1.9, 0.35, 0.5, 100_000.0)
    assert "TFLOP/s" not in format_epoch(row, 24) and "tflops" not in metrics_csv([row])
    row.tflops = 227.6
    assert format_epoch(row, 24).endswith("228 TFLOP/s") and metrics_csv([row]).splitlines()[0].endswith(",tflops")
