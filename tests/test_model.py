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
