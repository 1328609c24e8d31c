def capture_user_moe(gm, example_inputs, options, report):
    return []
