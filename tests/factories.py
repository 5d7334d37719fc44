import factory
from django.contrib.auth import get_user_model

PASSWORD = "a-long-test-password-1"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.PostGenerationMethodCall("set_password", PASSWORD)

    @factory.post_generation
    def saved(obj, create, extracted, **kwargs):
        if create:
            obj.save()


def make_campaign(name="Helpfulness", kind="side_by_side", **fields):
    from grading.models import Campaign

    defaults = {
        "overlap": 3,
        "gold_rate": 0.0,
        "lease_seconds": 600,
        "guidelines": "Prefer the **more helpful** answer.",
    }
    return Campaign.objects.create(name=name, kind=kind, **{**defaults, **fields})


def make_items(campaign, n, *, gold=None, prompt="Prompt {i}", models=("model-x", "model-y")):
    """n items with responses; ``gold`` (e.g. {"preferred": 0}) makes them gold items."""
    from grading.models import Item, Response

    items = Item.objects.bulk_create(
        [
            Item(
                campaign=campaign,
                prompt=prompt.format(i=i),
                external_id=f"ext-{i}",
                is_gold=gold is not None,
                gold_answer=gold,
            )
            for i in range(n)
        ]
    )
    count = campaign.task_kind.responses
    Response.objects.bulk_create(
        [
            Response(
                item=item, position=p, text=f"Answer {p} to item {item.pk}", model_name=models[p]
            )
            for item in items
            for p in range(count)
        ]
    )
    return items
